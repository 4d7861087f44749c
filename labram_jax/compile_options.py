"""XLA compiler options this project passes to every ``jax.jit`` it compiles, per backend.

On CPU, XLA hands fusions around matrix products to YNNPACK. By default it also pulls the
elementwise and reduction work around a product (softmax, LayerNorm statistics) into the same
YNNPACK subgraph; on LaBraM's shapes (200-wide tokens, 20-wide heads) that is slower than
XLA's own loop fusions. Giving YNNPACK only the products (``LIBRARY_FUSION_TYPE_DOT``) made
the Base pretraining step 1.25-1.30x and fine-tuning 1.02-1.05x as fast, with AVX2 and with
AVX-512, and cut their compiled memory by a fifth (1,556 -> 1,202 and 969 -> 744 MiB). The
tokenizer's step went to 0.84-0.87x then and kept XLA's defaults until its products, attention and
norms all ran as C++ kernels (session 34: 1.01-1.02x with the option, 398 -> 391 MiB; what XLA's
defaults still did there, the batch sums of the position tables' gradients, took ~2 ms each where a
loop fusion takes 0.05). BENCHMARKS.md: ``benchmarks.train_step --vs-xla-defaults``, steps alternated.

The options are probed once per process with a tiny compilation: a jaxlib that does not know
one (older or newer XLA) gets none, with a log line, rather than an error. Set
``LABRAM_JAX_XLA_OPTIONS=0`` to compile with XLA's defaults; an option already given in
``XLA_FLAGS`` is left to ``XLA_FLAGS``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import jax
import jax.numpy as jnp

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
_defaults_only = []  # non-empty inside xla_defaults()


@functools.cache
def compiler_options() -> dict[str, str]:
    """The options for this process's default backend: a subset of :data:`CPU_OPTIONS` on CPU
    (those XLA_FLAGS does not set, if this jaxlib accepts them), else ``{}``."""
    if jax.default_backend() != "cpu" or os.environ.get("LABRAM_JAX_XLA_OPTIONS", "1") == "0":
        return {}
    flags = os.environ.get("XLA_FLAGS", "")
    options = {k: v for k, v in CPU_OPTIONS.items() if f"--{k}" not in flags}
    if not options:
        return {}
    try:
        jax.jit(lambda x: x @ x).lower(jnp.ones((2, 2), jnp.float32)).compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as err:
        logging.info("XLA options %s not taken by this jaxlib (%s); compiling with XLA's defaults",
                     options, str(err).splitlines()[0])
        return {}
    return options


def jit(fun, **kwargs):
    """``jax.jit(fun, **kwargs)`` with :func:`compiler_options`; none inside :func:`xla_defaults`."""
    options = compiler_options() if not _defaults_only else {}
    return jax.jit(fun, compiler_options=options or None, **kwargs)


@contextlib.contextmanager
def xla_defaults():
    """Functions jitted (and compiled) inside this block get XLA's defaults: benchmarks measure
    what the options buy by compiling the same step both ways."""
    _defaults_only.append(True)
    try:
        yield
    finally:
        _defaults_only.pop()

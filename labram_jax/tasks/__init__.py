"""The three training stages (tokenizer, masked pretraining, fine-tuning): what each gives the
trainer (``stage.Stage``): model, loss, metrics, evaluation target, best-checkpoint metric,
end-of-run artefacts. ``labram_jax.steps.build_stage`` builds the one a config names.
"""

"""data_prep under hostile input: mutated EDF/BDF/FIF files never crash or hang the run,
and a file that cannot be read correctly never yields records (tests/fuzz_data_prep.py)."""

import pytest

from tests import fuzz_data_prep


def _assert_clean(result, count):
    assert result["tried"] == count
    assert result["crashes"] == 0 and result["hangs"] == 0, result["problems"]
    assert result["problems"] == []
    assert result["converted"] + result["rejected"] == count
    # Both outcomes occur: the generator is not only making garbage, nor only harmless changes.
    assert result["converted"] > count // 10 and result["rejected"] > count // 3
    assert result["peak_rss_mib"] < 4096


def test_fuzz_quick(tmp_path):
    result = fuzz_data_prep.campaign(150, seed=0, work=tmp_path, workers=2, file_timeout=120)
    _assert_clean(result, 150)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_fuzz_many(tmp_path, seed):
    result = fuzz_data_prep.campaign(520, seed=seed, work=tmp_path, workers=2, file_timeout=120)
    print({k: v for k, v in result.items() if k != "by_mutation"})
    _assert_clean(result, 520)

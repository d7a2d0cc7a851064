"""The shipped price table, the user override file and per-tier prices."""

from __future__ import annotations

from pathlib import Path

import pytest

from localroute.errors import ConfigError
from localroute.monitoring.pricing import Price, load_price_table


def test_shipped_table_has_dated_sourced_prices() -> None:
    table = load_price_table()
    assert len(table.prices) >= 5
    for price in table.prices.values():
        assert price.source.startswith("https://"), price
        assert price.as_of, price
        assert price.input_usd_per_mtok > 0 and price.output_usd_per_mtok > 0


def test_lookup_tolerates_provider_prefix_and_snapshot_suffix() -> None:
    table = load_price_table()
    base = table.lookup("gpt-4o-mini")
    assert base is not None
    assert table.lookup("openai/gpt-4o-mini") == base
    assert table.lookup("gpt-4o-mini-2024-07-18") == base
    assert table.lookup("GPT-4o-mini") == base
    assert table.lookup("gpt-4o-2024-08-06") == table.lookup("gpt-4o")  # longest prefix, not gpt-4o-mini
    assert table.lookup("my-local-model") is None


def test_cost_arithmetic_with_cached_tokens() -> None:
    p = Price("m", input_usd_per_mtok=0.15, output_usd_per_mtok=0.60, cached_input_usd_per_mtok=0.075)
    # 800 fresh prompt tokens, 200 cached, 500 completion
    assert p.cost_usd(1000, 500, 200) == pytest.approx((800 * 0.15 + 200 * 0.075 + 500 * 0.60) / 1e6)
    no_cache_price = Price("m", 1.0, 2.0)
    assert no_cache_price.cost_usd(1000, 0, 400) == pytest.approx(1000 / 1e6)  # no cached price: full price
    assert p.cost_usd(100, 0, 10_000) == pytest.approx(100 * 0.075 / 1e6)  # cached never exceeds prompt


def test_user_file_overrides_and_extends(tmp_path: Path) -> None:
    f = tmp_path / "prices.toml"
    f.write_text(
        '[models."gpt-4o-mini"]\ninput_usd_per_mtok = 1.0\noutput_usd_per_mtok = 2.0\nsource = "contract"\n'
        '[models."acme-large"]\ninput_usd_per_mtok = 3.0\noutput_usd_per_mtok = 4.0\n'
    )
    table = load_price_table(f)
    mini = table.lookup("gpt-4o-mini")
    assert mini is not None and mini.input_usd_per_mtok == 1.0 and mini.source == "contract"
    acme = table.lookup("acme-large")
    assert acme is not None and acme.output_usd_per_mtok == 4.0
    assert table.lookup("gpt-4o") == load_price_table().lookup("gpt-4o")


def test_bad_user_file_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "prices.toml"
    f.write_text('[models."x"]\ninput_usd_per_mtok = "cheap"\n')
    with pytest.raises(ConfigError):
        load_price_table(f)
    with pytest.raises(ConfigError):
        load_price_table(tmp_path / "missing.toml")


def test_tier_prices_override_the_table() -> None:
    table = load_price_table()
    p = table.with_override("gpt-4o-mini", 9.0, None)
    assert p is not None and p.input_usd_per_mtok == 9.0 and p.output_usd_per_mtok == 0.60
    assert p.cached_input_usd_per_mtok == 0.075
    assert table.with_override("unknown-model", 1.0, None) is None  # half a price for an unknown model
    q = table.with_override("unknown-model", 1.0, 2.0)
    assert q is not None and q.cost_usd(1_000_000, 1_000_000) == pytest.approx(3.0)


def test_self_hosted_price_is_a_share_of_gpu_hours() -> None:
    from localroute.monitoring.pricing import SelfHostedPrice
    from localroute.settings import TierSettings

    # measured throughput: 100 output tokens / 500 tok/s + 2000 prompt tokens / 10000 tok/s = 0.4 s of
    # a 4-GPU replica = 1.6 GPU-s at $3 per GPU-hour
    price = SelfHostedPrice(3.0, gpus=4, tokens_per_s=500.0, prompt_tokens_per_s=10_000.0)
    assert price.gpu_s(2000, 100, latency_s=9.0) == (pytest.approx(1.6), "measured_throughput")
    assert price.cost_usd(2000, 100, 9.0) == pytest.approx(1.6 / 3600 * 3.0)
    # without a prefill rate the prompt is not charged; without any rate, wall time x share
    assert SelfHostedPrice(3.0, gpus=4, tokens_per_s=500.0).gpu_s(2000, 100, 9.0)[0] == pytest.approx(0.8)
    assert SelfHostedPrice(3.0, gpus=2, gpu_share=0.25).gpu_s(2000, 100, 8.0) == (pytest.approx(4.0),
                                                                                    "wall_time_share")
    tier = TierSettings(name="fleet", kind="openai", model="m", base_url="http://fleet/v1", gpu_hour_usd=2.0, gpus=8)
    assert SelfHostedPrice.from_tier(tier) == SelfHostedPrice(2.0, gpus=8)
    assert SelfHostedPrice.from_tier(tier.model_copy(update={"gpu_hour_usd": None})) is None

"""Time floors (pop3d.auth.floors): the arithmetic of the floor, and who gets held; no real sleeps."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from pop3d.auth import floors
from pop3d.auth.floors import CAP, GRAIN, HALF_LIFE, Floor, Floors


def test_floor_is_the_larger_of_calibration_and_observations() -> None:
    f = Floor()
    assert f.value(0.0) == 0.0
    f.calibrate(0.003)
    assert f.value(0.0) == pytest.approx(0.003)
    f.observe(0.001, 0.0)  # cheaper than the calibration: the calibration stands
    assert f.value(0.0) == pytest.approx(0.003)
    f.observe(0.005, 0.0)  # a busy machine raises it
    assert f.value(0.0) == pytest.approx(0.005)


def test_observed_peak_decays_back_to_the_calibration() -> None:
    f = Floor()
    f.calibrate(0.002)
    f.observe(0.004, 100.0)
    assert f.value(100.0 + HALF_LIFE) == pytest.approx(0.002)
    f.observe(0.004, 200.0)
    assert f.value(200.0 + HALF_LIFE / 2) == pytest.approx(0.004 * 0.5**0.5)
    assert f.value(200.0 + 20 * HALF_LIFE) == pytest.approx(0.002)


def test_one_outlier_at_most_doubles_the_floor_but_sustained_slowness_climbs() -> None:
    f = Floor()
    f.calibrate(0.003)
    f.observe(0.5, 0.0)
    assert f.value(0.0) == pytest.approx(0.006)
    for _ in range(3):
        f.observe(0.5, 0.0)
    assert f.value(0.0) == pytest.approx(0.048)


def test_first_observation_counts_fully_and_everything_is_capped() -> None:
    f = Floor()
    f.observe(0.004, 0.0)
    assert f.value(0.0) == pytest.approx(0.004)
    g = Floor(cap=CAP)
    g.calibrate(60.0)
    assert g.value(0.0) == CAP
    for _ in range(20):
        g.observe(60.0, 0.0)
    assert g.value(0.0) == CAP


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waits: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    return waits


async def test_failures_wait_out_the_floor_rounded_to_a_tick(
    slept: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    fl = Floors()
    fl.calibrate("verify", 0.0032)
    monkeypatch.setattr(floors, "time", SimpleNamespace(monotonic=lambda: 10.0005))
    await fl.hold("verify", 10.0)  # a cheap failure: held until the floor, rounded up to whole ticks
    assert slept == [pytest.approx(0.004 - 0.0005)]
    await fl.hold("verify", 10.0, failed=False)  # a success says what it is anyway: not held
    assert len(slept) == 1
    monkeypatch.setattr(floors, "time", SimpleNamespace(monotonic=lambda: 10.005))
    await fl.hold("verify", 10.0)  # dearer than the floor: no wait, and the floor learns it
    assert len(slept) == 1
    assert fl.value("verify") == pytest.approx(0.005)
    assert GRAIN == 0.001


def test_cost_is_a_median_and_step_names_come_from_the_mechanism() -> None:
    calls: list[int] = []
    assert floors.cost(lambda: calls.append(1), runs=5) >= 0.0
    assert len(calls) == 5

    class Mech:
        name = "SCRAM-SHA-256"

        def resume(self) -> None:
            return None

    def plain() -> None:
        return None

    assert floors.step_name(Mech().resume) == "SCRAM-SHA-256"
    assert floors.step_name(plain).endswith("plain")


async def test_a_zero_cap_turns_holding_off(slept: list[float]) -> None:
    fl = Floors(cap=0.0)
    fl.calibrate("verify", 0.5)
    await fl.hold("verify", 0.0)
    assert slept == [] and fl.value("verify") == 0.0

"""`python -m deployments.launch` leaves Ray's workers at Ray's nice 15 when the engine loop can take -10 itself
(CAP_SYS_NICE), and starts them at 0 only when it cannot (then the loop would be stuck at 15)."""

from __future__ import annotations

from pathlib import Path

from deployments.launch import CAP_SYS_NICE, can_raise_priority


def status_file(tmp_path: Path, capabilities: int | None) -> str:
    lines = ["Name:\tpython", "CapInh:\t0000000000000000"]
    if capabilities is not None:
        lines.append(f"CapEff:\t{capabilities:016x}")
    path = tmp_path / "status"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_cap_sys_nice_in_the_effective_set_is_what_counts(tmp_path):
    assert can_raise_priority(status_file(tmp_path, 1 << CAP_SYS_NICE))
    assert can_raise_priority(status_file(tmp_path, 0x1fffeffffff))  # a root container's set
    assert not can_raise_priority(status_file(tmp_path, 0x1fffeffffff & ~(1 << CAP_SYS_NICE)))
    assert not can_raise_priority(status_file(tmp_path, 0))


def test_an_unreadable_status_counts_as_no_capability(tmp_path):
    assert not can_raise_priority(status_file(tmp_path, None))
    assert not can_raise_priority(str(tmp_path / "missing"))

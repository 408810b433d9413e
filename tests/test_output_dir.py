"""The converter's output handling (hadacore.checkpoint.output_dir): OUT always holds a whole
checkpoint or nothing, and never loses a directory the user made (issue 13, items 1-4).

Failures are injected at each step: before the write, between the two renames of a
``force`` swap (the process killed there), and during a concurrent conversion.
"""

import multiprocessing
import os
from pathlib import Path

import pytest

import hadacore.checkpoint.output_dir as od
from hadacore.checkpoint.output_dir import OutputDir, OutputExistsError


def _checkpoint(path: Path, text: str) -> None:
    (path / "model.safetensors").write_text(text)


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_publish_moves_the_work_directory_into_place(tmp_path):
    out = tmp_path / "a" / "ckpt"  # parents are created
    claim = OutputDir.claim(out)
    _checkpoint(claim.work, "new")
    assert not out.exists()  # nothing at OUT until it is whole
    assert claim.publish() == out
    assert (out / "model.safetensors").read_text() == "new"
    assert _siblings(out) == ["ckpt"]


def test_output_directory_gets_the_umask_permissions_of_a_plain_mkdir(tmp_path):
    old = os.umask(0o022)
    try:
        claim = OutputDir.claim(tmp_path / "ckpt")
        claim.publish()
        os.mkdir(tmp_path / "plain")
    finally:
        os.umask(old)
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o755


def test_existing_output_needs_force_and_is_checked_before_any_work(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    with pytest.raises(OutputExistsError, match="already exists; pass force=True"):
        OutputDir.claim(out)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="is not a directory"):
        OutputDir.claim(tmp_path / "file", force=True)
    assert _siblings(out) == ["ckpt", "file"]  # no work directory was left behind


@pytest.mark.parametrize("make", ["empty", "with_notes"])
def test_a_directory_that_appears_while_converting_is_never_replaced(tmp_path, make):
    out = tmp_path / "ckpt"
    claim = OutputDir.claim(out)
    _checkpoint(claim.work, "new")
    out.mkdir()  # the user's mkdir, or another conversion, while this one runs
    if make == "with_notes":
        (out / "notes.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match=r"appeared while converting.*finished checkpoint is at .*ckpt\.converted-"):
        claim.publish()
    assert sorted(p.name for p in out.iterdir()) == ([] if make == "empty" else ["notes.txt"])
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("ckpt.converted-")]
    assert len(kept) == 1 and (kept[0] / "model.safetensors").read_text() == "new"
    claim.discard()  # what the context manager does next: the kept checkpoint stays
    assert kept[0].exists()


def test_force_replaces_what_was_there_and_leaves_no_old_copy(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    _checkpoint(out, "old")
    claim = OutputDir.claim(out, force=True)
    _checkpoint(claim.work, "new")
    claim.publish()
    assert (out / "model.safetensors").read_text() == "new"
    assert _siblings(out) == ["ckpt"]


def test_force_replaces_only_the_directory_that_was_there_at_the_check(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    claim = OutputDir.claim(out, force=True)
    _checkpoint(claim.work, "new")
    os.rename(out, tmp_path / "moved_away")  # meanwhile, someone puts another directory at OUT
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="replaced by another directory"):
        claim.publish()
    assert (out / "notes.txt").read_text() == "precious"
    assert any(p.name.startswith("ckpt.converted-") for p in tmp_path.iterdir())


def test_failure_before_publishing_removes_only_the_work_directory(tmp_path):
    from hadacore.checkpoint.write import atomic_output_dir

    out = tmp_path / "ckpt"
    out.mkdir()
    _checkpoint(out, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(out, force=True) as work:
            _checkpoint(work, "half")
            raise RuntimeError("boom")
    assert (out / "model.safetensors").read_text() == "old"
    assert _siblings(out) == ["ckpt"]


def _die_at_rename(out: str, force: bool, die_at: int) -> None:
    """Child process: claim OUT, write, and be killed at the ``die_at``-th rename of publishing."""
    calls = []
    real = od.rename_noreplace

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == die_at:
            os._exit(9)  # a kill: no cleanup, no finally
        real(src, dst)

    od.rename_noreplace = rename
    claim = OutputDir.claim(out, force=force)
    _checkpoint(claim.work, "new")
    claim.publish()
    os._exit(0)


def _run_child(*args) -> int:
    p = multiprocessing.get_context("fork").Process(target=_die_at_rename, args=args)
    p.start()
    p.join()
    return p.exitcode


def test_a_kill_between_the_renames_of_a_force_swap_is_repaired_by_the_next_run(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    _checkpoint(out, "old")
    assert _run_child(str(out), True, 2) == 9  # OUT -> .old done, work -> OUT never happened
    assert not out.exists()
    assert sorted(n.split("-")[0] for n in _siblings(out)) == [".ckpt.old", ".ckpt.partial"]
    claim = OutputDir.claim(out, force=True)  # the rerun puts the old checkpoint back first
    assert (out / "model.safetensors").read_text() == "old"
    assert _siblings(out) == sorted(["ckpt", claim.work.name])
    claim.discard()
    assert _siblings(out) == ["ckpt"]


def test_a_kill_before_publishing_leaves_out_untouched_and_the_next_run_tidies(tmp_path):
    out = tmp_path / "ckpt"
    assert _run_child(str(out), False, 1) == 9
    assert not out.exists() and len(_siblings(out)) == 1  # only the dead run's work directory
    OutputDir.claim(out).discard()
    assert _siblings(out) == []


def test_a_kill_after_the_swap_leaves_the_new_checkpoint_and_the_next_run_drops_the_old(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    out.mkdir()
    _checkpoint(out, "old")
    monkeypatch.setattr(od.shutil, "rmtree", lambda *a, **k: os._exit(9) if "old" in str(a[0]) else None)
    assert _run_child(str(out), True, 99) == 9  # killed while deleting the old checkpoint
    monkeypatch.undo()
    assert (out / "model.safetensors").read_text() == "new"
    OutputDir.claim(out, force=True).discard()
    assert _siblings(out) == ["ckpt"]


def test_work_directories_of_live_runs_are_left_alone(tmp_path):
    out = tmp_path / "ckpt"
    first = OutputDir.claim(out)
    second = OutputDir.claim(out)  # same live pid: not a leftover
    assert first.work.exists() and second.work.exists()
    first.publish()
    with pytest.raises(OutputExistsError):
        second.publish()


def test_output_may_not_be_or_hold_the_source(tmp_path):
    src = tmp_path / "models" / "llama"
    src.mkdir(parents=True)
    with pytest.raises(ValueError, match="is the source model"):
        OutputDir.claim(src, force=True, protect=(src,))
    with pytest.raises(ValueError, match="or holds it"):
        OutputDir.claim(tmp_path / "models", force=True, protect=(src,))
    OutputDir.claim(src / "w4", protect=(src,)).discard()  # inside the source is fine


def test_unwritable_location_fails_at_the_claim(tmp_path, monkeypatch):
    parent = tmp_path / "file"
    parent.write_text("not a directory")
    with pytest.raises(OSError):
        OutputDir.claim(parent / "ckpt")

    def denied(path, mode=0o777):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(od.os, "mkdir", denied)
    with pytest.raises(PermissionError):
        OutputDir.claim(tmp_path / "ckpt")

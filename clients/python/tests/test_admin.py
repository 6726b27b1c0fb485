"""The Admin service (the model lifecycle, the keys) and health.

The last test stages, promotes and rolls back a second model: it leaves the
first one active again, as the other modules expect.
"""

import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

import handid

GALLERY = "py-admin"


def manifest_model_id(model_dir: Path) -> str:
    """The model id a checkpoint's manifest records."""
    for line in (model_dir / "handid.yaml").read_text().splitlines():
        if line.startswith("model_id:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no model_id in {model_dir}/handid.yaml")


def test_health_needs_no_key(server) -> None:
    with handid.Client(f"http://{server.address}") as client:
        assert client.health() == "SERVING"


def test_get_model(operator: handid.Client, model_dir: Path) -> None:
    status = operator.get_model()
    active = status.active
    assert active is not None
    assert active.model_id == manifest_model_id(model_dir)
    assert active.embedding_space == active.model_id  # a random init is its own space
    assert (active.embedding_dim, active.device, active.path) == (16, "cpu", str(model_dir))
    assert (active.calibrated, active.operating_points) == (False, ())
    assert active.loaded_at is not None
    assert (status.staged, status.coverage, status.rollback_target, status.side_info) == (None, (), None, None)


def test_get_model_names_the_side_information_model(side_info_server, keys: Dict[str, str]) -> None:
    server, side = side_info_server
    with handid.Client(server.address, api_key=keys["operator"]) as client:
        status = client.get_model()
    side_info = status.side_info
    assert side_info is not None
    assert side_info.model_id == manifest_model_id(side) != status.active.model_id
    assert (side_info.embedding_dim, side_info.device, side_info.path) == (16, "cpu", str(side))
    assert side_info.loaded_at is not None


def test_reload_model_swaps_the_same_folder(operator: handid.Client, model_dir: Path) -> None:
    before = operator.get_model().active
    reloaded = operator.reload_model()
    assert reloaded.staged is False
    assert reloaded.previous.model_id == reloaded.loaded.model_id == before.model_id
    assert reloaded.loaded.loaded_at > before.loaded_at
    assert operator.reload_model(str(model_dir)).loaded.path == str(model_dir)
    # Reloading the same model leaves nothing to roll back to.
    assert operator.get_model().rollback_target is None


def test_refused_model_changes(operator: handid.Client, work: Path) -> None:
    with pytest.raises(handid.InvalidArgument) as refused:
        operator.reload_model(str(work / "no-such-checkpoint"))
    assert "no-such-checkpoint" in refused.value.message
    with pytest.raises(handid.FailedPrecondition) as refused:
        operator.promote_model()
    assert "staged" in refused.value.message
    with pytest.raises(handid.FailedPrecondition) as refused:
        operator.rollback_model()
    assert "roll back" in refused.value.message


def test_reload_settings_adds_a_key(
    operator: handid.Client, server, bin_dir: Path, work: Path, keys: Dict[str, str]
) -> None:
    key_file = work / "desk.key"
    entry = subprocess.run(
        [str(bin_dir / "handid-server"), "keygen", "--id", "desk", "--scopes", "identify",
         "--key-out", str(key_file)],
        check=True, capture_output=True, text=True,
    ).stdout
    with handid.Client(server.address, api_key=key_file.read_text().strip()) as desk:
        with pytest.raises(handid.Unauthenticated):
            desk.get_subject(GALLERY, "nobody")
        with open(server.settings, "a") as settings:
            settings.write(entry)
        reloaded = operator.reload_settings()
        assert reloaded.path == str(server.settings)
        assert (reloaded.keys, reloaded.certificate_grants) == (len(keys) + 1, 0)
        assert (reloaded.added, reloaded.removed, reloaded.changed) == (("desk",), (), ())
        assert reloaded.restart_required == ()
        with pytest.raises(handid.NotFound):  # authenticated now
            desk.get_subject(GALLERY, "nobody")


def test_migration_cancel_promote_and_rollback(
    operator: handid.Client, bin_dir: Path, work: Path, model_dir: Path, persons: List[List[Path]]
) -> None:
    first = manifest_model_id(model_dir)
    second_dir = work / "model-2"
    subprocess.run(
        [str(bin_dir / "handid-trainer"), "init", "--arch", "tiny-vit", "--seed", "1",
         "--out", str(second_dir)],
        check=True, stdout=subprocess.DEVNULL,
    )
    operator.enroll(GALLERY, "before", persons[0][0])
    # Another embedding space: refused as a swap, accepted as a migration.
    with pytest.raises(handid.FailedPrecondition):
        operator.reload_model(str(second_dir))
    staged = operator.reload_model(str(second_dir), stage=True)
    assert staged.staged is True and staged.loaded.model_id == manifest_model_id(second_dir)
    operator.enroll(GALLERY, "during", persons[1][0])
    status = operator.get_model()
    assert (status.active.model_id, status.staged.model_id) == (first, staged.loaded.model_id)
    assert handid.GalleryCoverage(GALLERY, 2, 1) in status.coverage
    with pytest.raises(handid.FailedPrecondition) as refused:
        operator.promote_model(require_full_coverage=True)
    assert GALLERY in refused.value.message
    # Cancelled: the first model keeps serving, the staged model's template
    # of "during" is deleted; staged again, it starts from zero coverage.
    cancelled = operator.cancel_migration()
    assert (cancelled.active.model_id, cancelled.cancelled.model_id) == (first, staged.loaded.model_id)
    assert (cancelled.templates_deleted, cancelled.templates_kept) == (1, 0)
    assert operator.get_model().staged is None
    with pytest.raises(handid.FailedPrecondition):
        operator.cancel_migration()
    operator.reload_model(str(second_dir), stage=True)
    assert handid.GalleryCoverage(GALLERY, 2, 0) in operator.get_model().coverage
    operator.enroll(GALLERY, "during", persons[1][1])
    promoted = operator.promote_model()
    assert (promoted.active.model_id, promoted.previous.model_id) == (staged.loaded.model_id, first)
    assert operator.get_model().rollback_target.model_id == first
    rolled_back = operator.rollback_model(expected_active=staged.loaded.model_id)
    assert (rolled_back.active.model_id, rolled_back.previous.model_id) == (first, staged.loaded.model_id)
    assert operator.get_model().active.model_id == first
    # The same call again (its answer lost, say) changes nothing.
    with pytest.raises(handid.FailedPrecondition) as refused:
        operator.rollback_model(expected_active=staged.loaded.model_id)
    assert "nothing changed" in refused.value.message
    assert operator.get_model().active.model_id == first
    operator.delete_gallery(GALLERY)

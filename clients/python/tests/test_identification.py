"""Enroll, Identify, Verify and Embed against a real server.

The model is random (no identity in its embeddings, no calibrated
thresholds): a photo that was itself enrolled is what must come back first,
with a score of about 1, and decisions need an explicit threshold.
"""

import math
from pathlib import Path
from typing import List

import pytest

import handid

GALLERY = "py-identification"
#: Above every score of two different photos under the random model.
STRICT = 0.9999


@pytest.fixture(scope="module")
def enrolled(operator: handid.Client, persons: List[List[Path]]) -> List[List[Path]]:
    """alice enrolled from two paths, bob from the bytes of two photos."""
    alice, bob = persons[0][:2], persons[1][:2]
    operator.enroll(GALLERY, "alice", alice)
    operator.enroll(GALLERY, "bob", [p.read_bytes() for p in bob])
    return [alice, bob]


def test_enroll_from_paths_and_from_bytes(operator: handid.Client, persons: List[List[Path]]) -> None:
    model_id = operator.get_model().active.model_id
    from_paths = operator.enroll(GALLERY + "-enroll", "carol", persons[2][:2])
    assert from_paths == handid.EnrollResult(
        gallery_id=GALLERY + "-enroll",
        subject_id="carol",
        template_ids=from_paths.template_ids,
        template_count=2,
        replayed=False,
        model_id=model_id,
    )
    assert len(set(from_paths.template_ids)) == 2
    # One image as bytes (not in a list), then a bytearray: templates add up.
    photo = persons[3][0].read_bytes()
    assert operator.enroll(GALLERY + "-enroll", "dave", photo).template_count == 1
    more = operator.enroll(GALLERY + "-enroll", "dave", [bytearray(persons[3][1].read_bytes())])
    assert (len(more.template_ids), more.template_count) == (1, 2)
    subject = operator.get_subject(GALLERY + "-enroll", "dave")
    assert len(subject.templates) == 2


def test_identify_finds_the_enrolled_photo(operator: handid.Client, enrolled: List[List[Path]]) -> None:
    alice, _ = enrolled
    result = operator.identify(GALLERY, alice[0], top_k=5, threshold=0.5)
    assert result.candidates[0] == handid.Candidate(
        subject_id="alice", score=pytest.approx(1.0, abs=1e-4), rank=1
    )
    assert [c.subject_id for c in result.candidates] == ["alice", "bob"]
    assert [c.rank for c in result.candidates] == [1, 2]
    assert result.decision == handid.Decision(is_match=True, threshold=0.5, fmr=0.0)
    assert result.matched_subject_id == "alice"
    assert result.gallery_size == 2
    assert result.model_id == operator.get_model().active.model_id


def test_identify_no_match_above_every_score(operator: handid.Client, enrolled: List[List[Path]], persons: List[List[Path]]) -> None:
    stranger = persons[4][0]
    result = operator.identify(GALLERY, stranger, top_k=1, threshold=STRICT)
    assert len(result.candidates) == 1
    assert result.decision.is_match is False
    assert result.matched_subject_id is None


def test_default_rule_refused_without_calibration(operator: handid.Client, enrolled: List[List[Path]]) -> None:
    assert operator.get_model().active.calibrated is False
    with pytest.raises(handid.FailedPrecondition) as refused:
        operator.identify(GALLERY, enrolled[0][0])
    assert "calibrat" in refused.value.message
    with pytest.raises(handid.FailedPrecondition):
        operator.verify(GALLERY, "alice", enrolled[0][0])
    # A target FMR the checkpoint has no threshold for is a bad argument.
    with pytest.raises(handid.InvalidArgument) as refused:
        operator.identify(GALLERY, enrolled[0][0], target_fmr=1e-3)
    assert "FMR" in refused.value.message


def test_verify_same_photo_and_another_person(operator: handid.Client, enrolled: List[List[Path]]) -> None:
    alice, bob = enrolled
    same = operator.verify(GALLERY, "alice", alice[1], threshold=STRICT)
    assert same.score == pytest.approx(1.0, abs=1e-4)
    assert same.decision == handid.Decision(is_match=True, threshold=pytest.approx(STRICT), fmr=0.0)
    other = operator.verify(GALLERY, "alice", bob[0], threshold=STRICT)
    assert other.score < same.score
    assert other.decision.is_match is False


def test_embed_unit_vectors_of_the_model_dimension(operator: handid.Client, persons: List[List[Path]]) -> None:
    model = operator.get_model().active
    photos = [persons[0][0], persons[1][0].read_bytes(), persons[2][0]]
    result = operator.embed(photos)
    assert (result.dimension, result.model_id) == (model.embedding_dim, model.model_id)
    assert len(result.embeddings) == 3
    for vector in result.embeddings:
        assert isinstance(vector, list) and len(vector) == model.embedding_dim
        assert math.sqrt(sum(v * v for v in vector)) == pytest.approx(1.0, abs=1e-4)
    # The same photo embeds the same, alone or in a batch.
    assert operator.embed(persons[0][0]).embeddings[0] == pytest.approx(result.embeddings[0], abs=1e-5)


def test_idempotent_enrolment_replays(operator: handid.Client, persons: List[List[Path]]) -> None:
    gallery, photos = GALLERY + "-idem", persons[5][:2]
    first = operator.enroll(gallery, "erin", photos, idempotency_key="desk-1:erin")
    again = operator.enroll(gallery, "erin", photos, idempotency_key="desk-1:erin")
    assert first.replayed is False and again.replayed is True
    assert again.template_ids == first.template_ids
    assert len(operator.get_subject(gallery, "erin").templates) == 2
    with pytest.raises(handid.AlreadyExists) as refused:
        operator.enroll(gallery, "frank", photos, idempotency_key="desk-1:erin")
    assert "idempotency_key" in refused.value.message

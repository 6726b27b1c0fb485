"""GetSubject, ListSubjects, DeleteSubject and DeleteGallery."""

from datetime import datetime, timezone
from pathlib import Path
from typing import List

import pytest

import handid

GALLERY = "py-subjects"
NAMES = ["s1", "s2", "s3", "s4", "s5"]


@pytest.fixture(scope="module")
def gallery(operator: handid.Client, persons: List[List[Path]]) -> str:
    """Five subjects of one photo each, enrolled in reverse order."""
    for name, photos in reversed(list(zip(NAMES, persons))):
        operator.enroll(GALLERY, name, photos[0])
    return GALLERY


def test_get_subject(operator: handid.Client, persons: List[List[Path]]) -> None:
    enrolled = operator.enroll(GALLERY + "-get", "grace", persons[0][:2])
    subject = operator.get_subject(GALLERY + "-get", "grace")
    assert (subject.gallery_id, subject.subject_id) == (GALLERY + "-get", "grace")
    assert sorted(t.template_id for t in subject.templates) == sorted(enrolled.template_ids)
    assert {t.model_id for t in subject.templates} == {enrolled.model_id}
    now = datetime.now(timezone.utc)
    for when in [subject.created_at] + [t.created_at for t in subject.templates]:
        assert when is not None and when.tzinfo is not None
        assert abs((now - when).total_seconds()) < 600


def test_list_subjects_pages(operator: handid.Client, gallery: str) -> None:
    pages, token = [], ""
    while True:
        page = operator.list_subjects_page(gallery, page_size=2, page_token=token)
        pages.append([s.subject_id for s in page.subjects])
        token = page.next_page_token
        if not token:
            break
    assert pages == [["s1", "s2"], ["s3", "s4"], ["s5"]]
    assert [s.subject_id for s in operator.list_subjects(gallery, page_size=2)] == NAMES
    # The default page holds them all; each subject carries its templates.
    listed = list(operator.list_subjects(gallery))
    assert [s.subject_id for s in listed] == NAMES
    assert all(len(s.templates) == 1 for s in listed)


def test_delete_subject_then_not_found(operator: handid.Client, persons: List[List[Path]]) -> None:
    operator.enroll(GALLERY + "-delete", "heidi", persons[1][:2])
    operator.enroll(GALLERY + "-delete", "ivan", persons[2][0])
    erased = operator.delete_subject(GALLERY + "-delete", "heidi")
    assert erased.templates_deleted == 2
    with pytest.raises(handid.NotFound) as missing:
        operator.get_subject(GALLERY + "-delete", "heidi")
    assert missing.value.code.name == "NOT_FOUND"
    assert "heidi" in missing.value.message
    assert [s.subject_id for s in operator.list_subjects(GALLERY + "-delete")] == ["ivan"]
    # Identify no longer finds the erased subject's photo first.
    result = operator.identify(GALLERY + "-delete", persons[1][0], threshold=0.5)
    assert [c.subject_id for c in result.candidates] == ["ivan"]


def test_delete_gallery(operator: handid.Client, persons: List[List[Path]]) -> None:
    operator.enroll(GALLERY + "-drop", "judy", persons[3][:2])
    operator.enroll(GALLERY + "-drop", "ken", persons[4][0])
    erased = operator.delete_gallery(GALLERY + "-drop")
    assert (erased.subjects_deleted, erased.templates_deleted) == (2, 3)
    with pytest.raises(handid.NotFound) as missing:
        list(operator.list_subjects(GALLERY + "-drop"))
    assert GALLERY + "-drop" in missing.value.message

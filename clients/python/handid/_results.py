"""What the calls return: frozen dataclasses mirroring the handid.v1 responses.

Each holds exactly the fields of its message (see
``proto/handid/v1/handid.proto``); repeated fields become tuples, timestamps
aware UTC datetimes, and absent messages ``None``.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import List, Optional, Tuple

from google.protobuf.timestamp_pb2 import Timestamp

from .v1 import handid_pb2 as pb


def _time(message: object, field: str) -> Optional[datetime]:
    """The timestamp ``field`` of ``message`` in UTC, None when unset."""
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    t: Timestamp = getattr(message, field)
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    return epoch + timedelta(seconds=t.seconds, microseconds=t.nanos // 1000)


@dataclass(frozen=True)
class Decision:
    """Match / no match, and the threshold that decided it."""

    #: True when the best score reaches the threshold.
    is_match: bool
    #: The threshold applied.
    threshold: float
    #: The false-match rate the threshold was calibrated for; 0 for an
    #: explicit threshold.
    fmr: float

    @classmethod
    def _from(cls, m: pb.Decision) -> "Decision":
        return cls(is_match=m.is_match, threshold=m.threshold, fmr=m.fmr)


@dataclass(frozen=True)
class EnrollResult:
    """What :meth:`handid.Client.enroll` stored."""

    gallery_id: str
    subject_id: str
    #: The templates this call created (or, on a replay, had created).
    template_ids: Tuple[str, ...]
    #: How many templates the subject has now, for the active model.
    template_count: int
    #: True when this replays an earlier call with the same idempotency key.
    replayed: bool
    #: The model whose embeddings were stored.
    model_id: str

    @classmethod
    def _from(cls, m: pb.EnrollResponse) -> "EnrollResult":
        return cls(
            gallery_id=m.gallery_id,
            subject_id=m.subject_id,
            template_ids=tuple(m.template_ids),
            template_count=m.template_count,
            replayed=m.replayed,
            model_id=m.model_id,
        )


@dataclass(frozen=True)
class Candidate:
    """One ranked subject of an Identify call."""

    subject_id: str
    #: The best cosine similarity over the subject's templates.
    score: float
    #: 1-based rank.
    rank: int

    @classmethod
    def _from(cls, m: pb.Candidate) -> "Candidate":
        return cls(subject_id=m.subject_id, score=m.score, rank=m.rank)


@dataclass(frozen=True)
class IdentifyResult:
    """The answer of :meth:`handid.Client.identify`."""

    #: By descending score, at most top_k, one per subject.
    candidates: Tuple[Candidate, ...]
    #: Match / no match for the top candidate.
    decision: Decision
    #: The top candidate when the decision is a match, else None.
    matched_subject_id: Optional[str]
    #: How many subjects the gallery holds for this model.
    gallery_size: int
    model_id: str

    @classmethod
    def _from(cls, m: pb.IdentifyResponse) -> "IdentifyResult":
        return cls(
            candidates=tuple(Candidate._from(c) for c in m.candidates),
            decision=Decision._from(m.decision),
            matched_subject_id=m.matched_subject_id or None,
            gallery_size=m.gallery_size,
            model_id=m.model_id,
        )


@dataclass(frozen=True)
class VerifyResult:
    """The answer of :meth:`handid.Client.verify`."""

    #: The best cosine similarity over the subject's templates.
    score: float
    decision: Decision
    model_id: str

    @classmethod
    def _from(cls, m: pb.VerifyResponse) -> "VerifyResult":
        return cls(score=m.score, decision=Decision._from(m.decision), model_id=m.model_id)


@dataclass(frozen=True)
class EmbedResult:
    """The answer of :meth:`handid.Client.embed`."""

    #: One L2-normalised vector per input image, in order.
    embeddings: List[List[float]]
    dimension: int
    #: Compare these vectors only with templates of this model's space.
    model_id: str

    @classmethod
    def _from(cls, m: pb.EmbedResponse) -> "EmbedResult":
        return cls(
            embeddings=[list(e.values) for e in m.embeddings],
            dimension=m.dimension,
            model_id=m.model_id,
        )


@dataclass(frozen=True)
class TemplateInfo:
    """A stored template's metadata (never the vector)."""

    template_id: str
    #: The model that produced the embedding.
    model_id: str
    created_at: Optional[datetime]

    @classmethod
    def _from(cls, m: pb.TemplateInfo) -> "TemplateInfo":
        return cls(
            template_id=m.template_id,
            model_id=m.model_id,
            created_at=_time(m, "created_at"),
        )


@dataclass(frozen=True)
class Subject:
    """An enrolled subject and its templates."""

    gallery_id: str
    subject_id: str
    templates: Tuple[TemplateInfo, ...]
    created_at: Optional[datetime]

    @classmethod
    def _from(cls, m: pb.Subject) -> "Subject":
        return cls(
            gallery_id=m.gallery_id,
            subject_id=m.subject_id,
            templates=tuple(TemplateInfo._from(t) for t in m.templates),
            created_at=_time(m, "created_at"),
        )


@dataclass(frozen=True)
class SubjectPage:
    """One page of :meth:`handid.Client.list_subjects_page`."""

    #: Ordered by subject id.
    subjects: Tuple[Subject, ...]
    #: Pass it to get the next page; empty on the last page.
    next_page_token: str
    model_id: str

    @classmethod
    def _from(cls, m: pb.ListSubjectsResponse) -> "SubjectPage":
        return cls(
            subjects=tuple(Subject._from(s) for s in m.subjects),
            next_page_token=m.next_page_token,
            model_id=m.model_id,
        )


@dataclass(frozen=True)
class DeleteSubjectResult:
    """What :meth:`handid.Client.delete_subject` erased."""

    #: Templates erased, across all models.
    templates_deleted: int
    model_id: str

    @classmethod
    def _from(cls, m: pb.DeleteSubjectResponse) -> "DeleteSubjectResult":
        return cls(templates_deleted=m.templates_deleted, model_id=m.model_id)


@dataclass(frozen=True)
class DeleteGalleryResult:
    """What :meth:`handid.Client.delete_gallery` erased."""

    subjects_deleted: int
    templates_deleted: int
    model_id: str

    @classmethod
    def _from(cls, m: pb.DeleteGalleryResponse) -> "DeleteGalleryResult":
        return cls(
            subjects_deleted=m.subjects_deleted,
            templates_deleted=m.templates_deleted,
            model_id=m.model_id,
        )


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold calibrated at a false-match rate."""

    fmr: float
    threshold: float


@dataclass(frozen=True)
class ModelInfo:
    """A loaded model, as the server knows it."""

    #: Hash of the weights.
    model_id: str
    embedding_space: str
    compatible_spaces: Tuple[str, ...]
    #: e.g. "ViT-B/16", "RN50".
    architecture: str
    embedding_dim: int
    operating_points: Tuple[OperatingPoint, ...]
    #: The checkpoint folder it was loaded from (on the server).
    path: str
    #: "cpu" or "cuda:N".
    device: str
    loaded_at: Optional[datetime]
    #: Whether the checkpoint carries calibrated thresholds; without them
    #: Identify and Verify need an explicit threshold.
    calibrated: bool

    @classmethod
    def _from(cls, m: pb.ModelInfo) -> "ModelInfo":
        return cls(
            model_id=m.model_id,
            embedding_space=m.embedding_space,
            compatible_spaces=tuple(m.compatible_spaces),
            architecture=m.architecture,
            embedding_dim=m.embedding_dim,
            operating_points=tuple(
                OperatingPoint(fmr=p.fmr, threshold=p.threshold) for p in m.operating_points
            ),
            path=m.path,
            device=m.device,
            loaded_at=_time(m, "loaded_at"),
            calibrated=m.calibrated,
        )

    @classmethod
    def _field(cls, message: object, field: str) -> Optional["ModelInfo"]:
        """The ModelInfo ``field`` of ``message``, None when unset."""
        if not message.HasField(field):  # type: ignore[attr-defined]
            return None
        return cls._from(getattr(message, field))


@dataclass(frozen=True)
class GalleryCoverage:
    """Enrolment coverage of the staged model in one gallery."""

    gallery_id: str
    subjects: int
    #: Subjects with at least one template of the staged model.
    subjects_with_staged_templates: int


@dataclass(frozen=True)
class RetiredModel:
    """A model that was active once and has been replaced."""

    model_id: str
    embedding_space: str
    #: The checkpoint folder it was last loaded from.
    path: str
    #: When it stopped being the active model.
    active_until: Optional[datetime]


@dataclass(frozen=True)
class ModelStatus:
    """The answer of :meth:`handid.Client.get_model`."""

    active: Optional[ModelInfo]
    #: Set while a migration is staged.
    staged: Optional[ModelInfo]
    coverage: Tuple[GalleryCoverage, ...]
    #: What :meth:`handid.Client.rollback_model` would make active again.
    rollback_target: Optional[RetiredModel]
    #: The side-information model (settings ``model.side_info``) whose
    #: feature of every enrolled image is stored for template upgrades.
    side_info: Optional[ModelInfo] = None

    @classmethod
    def _from(cls, m: pb.GetModelResponse) -> "ModelStatus":
        target = None
        if m.HasField("rollback_target"):
            t = m.rollback_target
            target = RetiredModel(
                model_id=t.model_id,
                embedding_space=t.embedding_space,
                path=t.path,
                active_until=_time(t, "active_until"),
            )
        return cls(
            active=ModelInfo._field(m, "active"),
            staged=ModelInfo._field(m, "staged"),
            coverage=tuple(
                GalleryCoverage(
                    gallery_id=c.gallery_id,
                    subjects=c.subjects,
                    subjects_with_staged_templates=c.subjects_with_staged_templates,
                )
                for c in m.coverage
            ),
            rollback_target=target,
            side_info=ModelInfo._field(m, "side_info"),
        )


@dataclass(frozen=True)
class ReloadResult:
    """The answer of :meth:`handid.Client.reload_model`."""

    previous: Optional[ModelInfo]
    #: The model now active (swap) or staged (migration).
    loaded: Optional[ModelInfo]
    staged: bool

    @classmethod
    def _from(cls, m: pb.ReloadModelResponse) -> "ReloadResult":
        return cls(
            previous=ModelInfo._field(m, "previous"),
            loaded=ModelInfo._field(m, "loaded"),
            staged=m.staged,
        )


@dataclass(frozen=True)
class ModelSwap:
    """The answer of :meth:`handid.Client.promote_model` and
    :meth:`handid.Client.rollback_model`."""

    #: The model now active.
    active: Optional[ModelInfo]
    #: The model it replaced.
    previous: Optional[ModelInfo]

    @classmethod
    def _from(cls, m: object) -> "ModelSwap":
        return cls(
            active=ModelInfo._field(m, "active"),
            previous=ModelInfo._field(m, "previous"),
        )


@dataclass(frozen=True)
class MigrationCancelled:
    """The answer of :meth:`handid.Client.cancel_migration`."""

    #: The model that keeps serving.
    active: Optional[ModelInfo]
    #: The model that was staged and no longer is.
    cancelled: Optional[ModelInfo]
    #: Templates of the cancelled model deleted, and still stored.
    templates_deleted: int
    templates_kept: int
    #: Subjects whose templates of the cancelled model were kept because
    #: they hold none the active model can compare.
    subjects_without_active_templates: int
    #: Whether the cancelled model is the rollback target (its templates
    #: all kept).
    rollback_target: bool

    @classmethod
    def _from(cls, m: pb.CancelMigrationResponse) -> "MigrationCancelled":
        return cls(
            active=ModelInfo._field(m, "active"),
            cancelled=ModelInfo._field(m, "cancelled"),
            templates_deleted=m.templates_deleted,
            templates_kept=m.templates_kept,
            subjects_without_active_templates=m.subjects_without_active_templates,
            rollback_target=m.rollback_target,
        )


@dataclass(frozen=True)
class SettingsReload:
    """The answer of :meth:`handid.Client.reload_settings`."""

    #: The settings file read.
    path: str
    #: API keys and certificate grants now in force.
    keys: int
    certificate_grants: int
    #: Key and grant ids added, removed, and kept with other scopes,
    #: galleries or hash.
    added: Tuple[str, ...]
    removed: Tuple[str, ...]
    changed: Tuple[str, ...]
    #: Settings (dotted keys) that differ from the running ones and apply at
    #: the next start.
    restart_required: Tuple[str, ...]

    @classmethod
    def _from(cls, m: pb.ReloadSettingsResponse) -> "SettingsReload":
        return cls(
            path=m.path,
            keys=m.keys,
            certificate_grants=m.certificate_grants,
            added=tuple(m.added),
            removed=tuple(m.removed),
            changed=tuple(m.changed),
            restart_required=tuple(m.restart_required),
        )

"""Python client of the handid hand-biometrics service (gRPC API handid.v1).

    import handid

    with handid.Client("127.0.0.1:50051", api_key="...") as client:
        client.enroll("site-1", "alice", ["alice-1.jpg", "alice-2.jpg"])
        result = client.identify("site-1", "probe.jpg")
        print(result.matched_subject_id, result.candidates[0].score)

Every refused call raises a :class:`HandIdError` subclass carrying the gRPC
status code and the server's message.
"""

from ._client import TLS, Client, Image, Images
from ._errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    HandIdError,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from ._results import (
    Candidate,
    Decision,
    DeleteGalleryResult,
    DeleteSubjectResult,
    EmbedResult,
    EnrollResult,
    GalleryCoverage,
    IdentifyResult,
    MigrationCancelled,
    ModelInfo,
    ModelStatus,
    ModelSwap,
    OperatingPoint,
    ReloadResult,
    RetiredModel,
    SettingsReload,
    Subject,
    SubjectPage,
    TemplateInfo,
    VerifyResult,
)

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Candidate",
    "Client",
    "DeadlineExceeded",
    "Decision",
    "DeleteGalleryResult",
    "DeleteSubjectResult",
    "EmbedResult",
    "EnrollResult",
    "FailedPrecondition",
    "GalleryCoverage",
    "HandIdError",
    "IdentifyResult",
    "Image",
    "Images",
    "Internal",
    "InvalidArgument",
    "MigrationCancelled",
    "ModelInfo",
    "ModelStatus",
    "ModelSwap",
    "NotFound",
    "OperatingPoint",
    "OutOfRange",
    "PermissionDenied",
    "ReloadResult",
    "ResourceExhausted",
    "RetiredModel",
    "SettingsReload",
    "Subject",
    "SubjectPage",
    "TLS",
    "TemplateInfo",
    "Unauthenticated",
    "Unavailable",
    "VerifyResult",
]

"""The client: one gRPC channel to a handid server, a method per RPC."""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ._errors import error_from_rpc
from ._results import (
    DeleteGalleryResult,
    DeleteSubjectResult,
    EmbedResult,
    EnrollResult,
    IdentifyResult,
    MigrationCancelled,
    ModelStatus,
    ModelSwap,
    ReloadResult,
    SettingsReload,
    Subject,
    SubjectPage,
    VerifyResult,
)
from .v1 import handid_pb2 as pb
from .v1 import handid_pb2_grpc as pb_grpc

#: An image: a path to a file, or its encoded bytes (JPEG, PNG, BMP, PGM).
Image = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]
#: One image or several.
Images = Union[Image, Sequence[Image]]
#: PEM data, or the path of a PEM file.
Pem = Union[str, "os.PathLike[str]", bytes]

#: The largest message sent or received (the Rust CLI's limit too).
MAX_MESSAGE_BYTES = 64 << 20

_Response = TypeVar("_Response")


@dataclass(frozen=True)
class TLS:
    """TLS settings for a server with a private CA, or for mutual TLS.

    Each field is PEM bytes or the path of a PEM file. ``ca`` is the CA that
    signed the server's certificate (None: the system's roots); ``cert`` and
    ``key``, given together, are the client's certificate and key for a
    mutual-TLS listener (the server grants the certificate under
    ``auth.certificates``; no API key is then needed).
    """

    ca: Optional[Pem] = None
    cert: Optional[Pem] = None
    key: Optional[Pem] = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS: cert and key go together (mutual TLS needs both)")

    def __repr__(self) -> str:
        # A key given as bytes is a secret: name only what is set.
        set_fields = [name for name in ("ca", "cert", "key") if getattr(self, name) is not None]
        return f"TLS({', '.join(set_fields)} set)" if set_fields else "TLS(system roots)"

    def credentials(self) -> grpc.ChannelCredentials:
        """The gRPC channel credentials these settings describe."""
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.ca),
            private_key=_pem(self.key),
            certificate_chain=_pem(self.cert),
        )


class Client:
    """A connection to a handid server (the handid.v1 HandId and Admin services).

    ``address`` is ``host:port``, ``http://host:port`` (plain text) or
    ``https://host:port`` (TLS with the system's roots unless ``tls`` says
    otherwise). ``tls`` is None (plain text, unless the address is
    ``https://``), True (TLS with the system's roots) or a :class:`TLS`
    (private CA, mutual TLS). ``api_key`` is sent with every call as
    ``authorization: Bearer <key>``. ``timeout`` (seconds, None for none)
    bounds every call; reloads load a checkpoint and every gallery, so the
    default allows minutes, as the ``handid`` CLI does.

    A refused call raises a :class:`handid.HandIdError` subclass carrying
    the gRPC status code and the server's message; a server that cannot be
    reached raises :class:`handid.Unavailable`. Use it as a context manager,
    or call :meth:`close`. One client may be shared by threads.
    """

    def __init__(
        self,
        address: str,
        api_key: Optional[str] = None,
        tls: Union[None, bool, TLS] = None,
        timeout: Optional[float] = 600.0,
    ) -> None:
        target, tls = _parse_address(address, tls)
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        if tls is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, tls.credentials(), options=options)
        self._address = address
        self._tls = tls is not None
        self._metadata: Tuple[Tuple[str, str], ...] = ()
        if api_key is not None:
            if not api_key or not all(" " <= ch <= "~" for ch in api_key):
                raise ValueError("the API key must be printable ASCII (a header carries it)")
            self._metadata = (("authorization", f"Bearer {api_key}"),)
        self._timeout = timeout
        self._handid = pb_grpc.HandIdStub(self._channel)
        self._admin = pb_grpc.AdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __repr__(self) -> str:
        return f"Client({self._address!r}, tls={self._tls})"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def _call(self, method: Callable[..., _Response], request: object) -> _Response:
        """Runs one unary call, turning a gRPC failure into a HandIdError."""
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None

    # --- HandId: identification (scopes enroll, identify, embed) ---

    def enroll(
        self,
        gallery: str,
        subject: str,
        images: Images,
        idempotency_key: Optional[str] = None,
    ) -> EnrollResult:
        """Adds images of ``subject`` to ``gallery`` (both created on first
        use), one template per image (scope ``enroll``).

        ``images``: one image or a list, each a path or encoded bytes. With
        ``idempotency_key``, a retry returns the first result
        (``replayed=True``) instead of enrolling twice; the same key with
        another subject or other images raises :class:`handid.AlreadyExists`.
        """
        request = pb.EnrollRequest(
            gallery_id=gallery,
            subject_id=subject,
            images=_images(images),
            idempotency_key=idempotency_key or "",
        )
        return EnrollResult._from(self._call(self._handid.Enroll, request))

    def identify(
        self,
        gallery: str,
        image: Image,
        top_k: int = 5,
        threshold: Optional[float] = None,
        target_fmr: Optional[float] = None,
    ) -> IdentifyResult:
        """Ranks the subjects of ``gallery`` by similarity to ``image`` (1:N,
        scope ``identify``) and decides match / no match for the best.

        The decision uses ``threshold`` (a cosine similarity), or the model's
        threshold calibrated at ``target_fmr`` (1e-2, 1e-3, 1e-4), or, with
        neither, the model's default (FMR 1e-3); a model without calibrated
        thresholds refuses the default with
        :class:`handid.FailedPrecondition`.
        """
        request = pb.IdentifyRequest(
            gallery_id=gallery,
            image=_image(image),
            top_k=top_k,
            rule=_rule(threshold, target_fmr),
        )
        return IdentifyResult._from(self._call(self._handid.Identify, request))

    def verify(
        self,
        gallery: str,
        subject: str,
        image: Image,
        threshold: Optional[float] = None,
        target_fmr: Optional[float] = None,
    ) -> VerifyResult:
        """Compares ``image`` with the enrolled ``subject`` (1:1, scope
        ``identify``); the decision rule as for :meth:`identify`."""
        request = pb.VerifyRequest(
            gallery_id=gallery,
            subject_id=subject,
            image=_image(image),
            rule=_rule(threshold, target_fmr),
        )
        return VerifyResult._from(self._call(self._handid.Verify, request))

    def embed(self, images: Images) -> EmbedResult:
        """The L2-normalised embedding of each image, stored nowhere (scope
        ``embed``, with a key not limited to galleries)."""
        request = pb.EmbedRequest(images=_images(images))
        return EmbedResult._from(self._call(self._handid.Embed, request))

    # --- HandId: subjects and galleries ---

    def get_subject(self, gallery: str, subject: str) -> Subject:
        """One subject and its templates' metadata (scope ``identify``);
        :class:`handid.NotFound` for an unknown gallery or subject."""
        request = pb.GetSubjectRequest(gallery_id=gallery, subject_id=subject)
        return Subject._from(self._call(self._handid.GetSubject, request).subject)

    def list_subjects_page(
        self, gallery: str, page_size: int = 0, page_token: str = ""
    ) -> SubjectPage:
        """One page of the subjects of ``gallery``, by subject id (scope
        ``identify``). ``page_size`` 1..1000, 0 for the server's default
        (100); ``page_token`` empty for the first page, then the previous
        page's ``next_page_token``."""
        request = pb.ListSubjectsRequest(
            gallery_id=gallery, page_size=page_size, page_token=page_token
        )
        return SubjectPage._from(self._call(self._handid.ListSubjects, request))

    def list_subjects(self, gallery: str, page_size: int = 0) -> Iterator[Subject]:
        """Every subject of ``gallery``, by subject id, fetching one page at
        a time as the iteration goes (see :meth:`list_subjects_page`)."""
        token = ""
        while True:
            page = self.list_subjects_page(gallery, page_size, token)
            yield from page.subjects
            token = page.next_page_token
            if not token:
                return

    def delete_subject(self, gallery: str, subject: str) -> DeleteSubjectResult:
        """Erases a subject and all its templates (scope ``enroll``)."""
        request = pb.DeleteSubjectRequest(gallery_id=gallery, subject_id=subject)
        return DeleteSubjectResult._from(self._call(self._handid.DeleteSubject, request))

    def delete_gallery(self, gallery: str) -> DeleteGalleryResult:
        """Erases a gallery with every subject and template (scope
        ``enroll``)."""
        request = pb.DeleteGalleryRequest(gallery_id=gallery)
        return DeleteGalleryResult._from(self._call(self._handid.DeleteGallery, request))

    # --- Admin: the model lifecycle and the keys (scope admin) ---

    def get_model(self) -> ModelStatus:
        """The active model, the staged one with its coverage, and the
        rollback target."""
        return ModelStatus._from(self._call(self._admin.GetModel, pb.GetModelRequest()))

    def reload_model(self, path: Optional[str] = None, stage: bool = False) -> ReloadResult:
        """Loads a checkpoint folder on the server (None: the active model's
        folder again) and swaps it in. A model of another embedding space is
        refused (:class:`handid.FailedPrecondition`) unless ``stage`` is
        true, which stages it as a migration; a bad checkpoint is refused
        (:class:`handid.InvalidArgument`) and the old model keeps serving."""
        mode = pb.RELOAD_MODE_STAGE_MIGRATION if stage else pb.RELOAD_MODE_UNSPECIFIED
        request = pb.ReloadModelRequest(path=path or "", mode=mode)
        return ReloadResult._from(self._call(self._admin.ReloadModel, request))

    def promote_model(self, require_full_coverage: bool = False) -> ModelSwap:
        """Makes the staged model active, ending a migration; with
        ``require_full_coverage``, only if every subject has a template of
        it. Nothing staged: :class:`handid.FailedPrecondition`."""
        request = pb.PromoteModelRequest(require_full_coverage=require_full_coverage)
        return ModelSwap._from(self._call(self._admin.PromoteModel, request))

    def cancel_migration(self) -> MigrationCancelled:
        """Abandons the staged migration: the active model keeps serving,
        the staged model's templates are deleted (but those a subject or a
        rollback still needs). Nothing staged:
        :class:`handid.FailedPrecondition`."""
        request = pb.CancelMigrationRequest()
        return MigrationCancelled._from(self._call(self._admin.CancelMigration, request))

    def rollback_model(self, expected_active: Optional[str] = None) -> ModelSwap:
        """Makes the previous model active again; refused
        (:class:`handid.FailedPrecondition`, saying why) when there is none
        or it cannot serve every subject. With ``expected_active`` (a model
        id), only while that model is the active one: a retry of a rollback
        whose answer was lost is then refused instead of rolling forward
        again."""
        request = pb.RollbackModelRequest(expected_active=expected_active or "")
        return ModelSwap._from(self._call(self._admin.RollbackModel, request))

    def reload_settings(self) -> SettingsReload:
        """Makes the server read its settings file again and apply its API
        keys and certificate grants (this replica only)."""
        request = pb.ReloadSettingsRequest()
        return SettingsReload._from(self._call(self._admin.ReloadSettings, request))

    # --- Health (open, no key needed) ---

    def health(self, service: str = "") -> str:
        """The standard gRPC health service's (``grpc.health.v1``) status of
        ``service`` (empty: the whole server): ``"SERVING"``,
        ``"NOT_SERVING"``, ``"SERVICE_UNKNOWN"`` or ``"UNKNOWN"``."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = self._call(self._health.Check, request)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def _parse_address(address: str, tls: Union[None, bool, TLS]) -> Tuple[str, Optional[TLS]]:
    """The gRPC target of ``address`` and the TLS settings to use (None:
    plain text)."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        target = address
    elif scheme == "http":
        if tls:
            raise ValueError(f"{address!r} names a plain-text server, but TLS was asked for")
        target = rest
    elif scheme == "https":
        target = rest
        tls = tls or True
    else:
        raise ValueError(f"{address!r}: the scheme must be http:// or https://")
    target = target.rstrip("/")
    if not target:
        raise ValueError(f"{address!r} names no host")
    if tls is True:
        return target, TLS()
    return target, tls or None


def _pem(value: Optional[Pem]) -> Optional[bytes]:
    """PEM bytes, read from the file when given a path."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def _image(image: Image) -> pb.Image:
    """An Image message from a path or encoded bytes."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return pb.Image(data=bytes(image))
    if isinstance(image, (str, os.PathLike)):
        return pb.Image(data=Path(image).read_bytes())
    raise TypeError(f"an image is a path or encoded bytes, not {type(image).__name__}")


def _images(images: Images) -> List[pb.Image]:
    """Image messages from one image or a sequence of them."""
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview)):
        return [_image(images)]
    return [_image(image) for image in images]


def _rule(threshold: Optional[float], target_fmr: Optional[float]) -> Optional[pb.DecisionRule]:
    """The DecisionRule of an explicit threshold or a target FMR (None:
    the model's default)."""
    if threshold is not None and target_fmr is not None:
        raise ValueError("give threshold or target_fmr, not both")
    if threshold is not None:
        return pb.DecisionRule(threshold=threshold)
    if target_fmr is not None:
        return pb.DecisionRule(target_fmr=target_fmr)
    return None

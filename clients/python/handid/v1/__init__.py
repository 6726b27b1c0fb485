"""The handid.v1 protocol stubs (``handid_pb2``, ``handid_pb2_grpc``).

Generated from ``proto/handid/v1/handid.proto`` when the package is built;
most callers want :class:`handid.Client` instead.
"""

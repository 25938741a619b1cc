"""KServe v2 gRPC stubs, generated from proto/ when the package is built.

They register their descriptors in POOL, a private descriptor pool, not in
protobuf's default one: tritonclient registers the same protocol (package
"inference") there, and both clients must work in one process.
"""
from google.protobuf import descriptor_pool as _descriptor_pool

POOL = _descriptor_pool.DescriptorPool()

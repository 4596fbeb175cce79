"""The receiving side and control plane of segnode: SCP, storage, assembly, routing, database, CLI."""

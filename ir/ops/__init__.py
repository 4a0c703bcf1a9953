"""kiln's op declarations. Importing this package registers every op."""

from kiln.ir.ops import data, dense, elementwise, norm, pool, reduce, shape  # noqa: F401

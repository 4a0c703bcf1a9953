"""kiln's op declarations. Importing this package registers every op."""

from kiln.ir.ops import (  # noqa: F401
    data,
    dense,
    elementwise,
    index,
    norm,
    pool,
    quant,
    recurrent,
    reduce,
    shape,
)

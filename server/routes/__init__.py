"""One blueprint per module: metadata, resources (REST per type), bundles (batch/transaction),
operations ($validate, $load-iop)."""

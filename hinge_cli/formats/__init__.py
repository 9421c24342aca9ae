"""On-disk formats: one module per schema, each with a typed reader and writer that every stage uses."""

"""Planning: what each rank writes, key validation across ranks, read plans for load."""

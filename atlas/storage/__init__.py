"""Storage: Neo4j graph store and DuckDB statistics."""

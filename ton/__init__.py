"""cocoon-node: ton package."""

"""cocoon-node: inference package."""

"""cocoon-node: market package."""

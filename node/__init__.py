"""cocoon-node: node package."""

"""The catalog: categories, products, SKUs and their stock ledger."""

"""Dataset audits: the engine and store (heatlens.audit.engine/store) and the analysis on top of them."""

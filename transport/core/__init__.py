"""The family-free core: architecture switches, the axis table, symmetries, one functional forward,
task vectors and the numerical building blocks of the methods. Nothing here knows a model family's
parameter names; family adapters (:mod:`transport.families`) translate to and from this layout."""

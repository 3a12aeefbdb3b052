"""Pure reward math (numpy in, numpy out): latent (MSA, LaCoMSA), implicit (ICR) and consistency (DCO, RankC).

See docs/methods.md, sections 1-3. No Ray, model or I/O code lives here.
"""

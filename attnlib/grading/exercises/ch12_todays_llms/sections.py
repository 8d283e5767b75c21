"""The sections of chapter 12's page that the feedback of its exercises points to."""

PAGE = "12_todays_llms.html"
BLOCK = f"{PAGE}#a-pre-norm-decoder-block"
GENERATION = f"{PAGE}#generation-with-a-kv-cache"
PAGED = f"{PAGE}#paged-kv-cache-blocks-and-a-block-table"
LATENT = f"{PAGE}#latent-attention-and-weight-absorption"
SINKS = f"{PAGE}#sliding-windows-and-attention-sinks"

"""LoRA's data-driven initialisations (PEFT's ``init_lora_weights`` beyond ``True``/``False``/``"gaussian"``).

* :mod:`.svd`: factors from the base weight alone: PiSSA (exact and fast randomized SVD), OLoRA, orthogonal.
* :mod:`.data`: factors from data passed as arguments: EVA (layer input activations), CorDA (input covariances).
* :mod:`.api`: :func:`~.api.lora_init` (params plus the residual base weights, never written into the model)
  and :func:`~.api.to_plain_lora` (PEFT's conversion of a PiSSA/OLoRA/CorDA adapter to a plain LoRA delta).
* :mod:`.guard`: base fingerprints recorded at init, so that every merge (and ``validate`` / ``load`` onto a
  model) refuses a PiSSA/OLoRA/CorDA adapter on the original base weights, or on a base it cannot verify.

Every function is pure: randomness only from an explicit ``torch.Generator``, data only from arguments.
"""

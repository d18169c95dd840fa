"""HF <-> Cerebras conversion of weights, masks and LoRA adapters; PEFT and merged-sparse exports.

A face on the core: the name map it applies (`modelzoo_ext.name_map`) and the mask view
(`modelzoo_ext.masks.view`) live in the core, shared with the ModelZoo face.
"""

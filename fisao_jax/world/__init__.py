"""The synthetic world's pretrained models: tokenizer, CLIP (the verifier) and SFT LLaVA (the policy).

  configs.py        settings of every stage (plain dataclasses) and the default build
  build.py          `build_world(workdir, cfg)`: trains the three stages or loads them from the cache
  pretrain_clip.py  the small CLIP: contrastive + presence pretraining on generated scenes
  sft.py            the small LLaVA: SFT on captions that hallucinate co-occurring objects
"""

"""The Monitor inside other people's trainers: `hf_callback.RankProbeCallback` for the transformers
Trainer, `lightning_callback.RankProbeCallback` for Lightning. Each imports its framework only when used."""

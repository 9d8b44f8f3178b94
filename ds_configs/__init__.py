"""DeepSpeed JSON configs shipped with gift_dist (installed as the package gift_dist.ds_configs)."""

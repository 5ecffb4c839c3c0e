"""What one rank keeps on its device, all from its ElasticPool: rank state, weight arena, activation workspace."""

"""Task adapters: formats on disk, the registry (name -> handle), device slots and host cache."""

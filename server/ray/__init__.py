"""peftserve on Ray Serve: one engine per replica behind Ray Serve's gRPC proxy.

The adapter a request names is its multiplexed model id, so Ray Serve routes it to a replica
that already holds the adapter. Importing this package does not import Ray; `app` does.
Install with `pip install 'peftserve[ray]'`.
"""

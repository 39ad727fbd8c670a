"""coord: an etcd v3 client for Twisted with coordination recipes."""

"""The per-host peer server (`dfget server`): serves verified pieces to other peers."""

"""The CloudHSMv2 control plane: the AWS API (`BaldrApiService.*`, AWS JSON 1.1 and Smithy RPC v2
CBOR) in front of the clusters the daemon hosts (see docs/cloudhsmv2.md)."""

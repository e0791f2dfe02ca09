# Makes the Standard Webhooks v1a (Ed25519) vectors of src/signature/standard.rs with a second
# implementation, Python's `cryptography` (48.0.0 made the committed ones): `python3 make_standard_webhooks_v1a.py`.
import base64, cryptography
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives import serialization
def raw_pub(k): return k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
def raw_priv(k): return k.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
seed = bytes(range(32)); other_seed = bytes(range(32, 64))
key = Ed25519PrivateKey.from_private_bytes(seed); other = Ed25519PrivateKey.from_private_bytes(other_seed)
msg_id, ts, body = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", 1700000000, '{"type":"invoice.paid","data":{"id":"in_1"}}'
signed = f"{msg_id}.{ts}.{body}".encode()
print("cryptography", cryptography.__version__)
print("whsk_" + base64.b64encode(raw_priv(key)).decode())
print("whpk_" + base64.b64encode(raw_pub(key)).decode())
print("other whpk_" + base64.b64encode(raw_pub(other)).decode())
print("v1a," + base64.b64encode(key.sign(signed)).decode())
print("other v1a," + base64.b64encode(other.sign(signed)).decode())

@0xbd29e9e421ccabf0;
# Credentials: an operator key vouches for a principal.

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("tracemesh::wire");

struct Credential {
  version @0 :UInt16;         # 1
  id @1 :Data;                # 16 random bytes; revocation names this
  subjectKey @2 :Data;        # the principal's Ed25519 public key (32 bytes)
  name @3 :Text;
  roles @4 :List(Text);
  tenant @5 :Text;
  site @6 :Text;
  tier @7 :Text;              # device | edge | regional | centre | "" (clients)
  issuedAtMs @8 :Int64;
  expiresAtMs @9 :Int64;      # 0 = never
  issuerKey @10 :Data;        # the operator's Ed25519 public key
}

struct SignedCredential {
  credential @0 :Data;        # a serialized Credential (exact bytes signed)
  signature @1 :Data;         # Ed25519 by issuerKey over "tracemesh-cred-v1" | credential
}

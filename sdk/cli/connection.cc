#include "connection.h"

namespace tracemesh::cli {

void ConnectionFlags::add_to(CLI::App& cmd) {
  cmd.add_option("-u,--url", url, "broker endpoint: tcp://HOST:PORT, ipc:///PATH, unix:///PATH or native://HOST:PORT")
      ->envname("TRACEMESH_URL")
      ->required();
  cmd.add_option("-i,--identity", identity, "identity file (tracemesh keygen)")
      ->envname("TRACEMESH_IDENTITY")
      ->required();
  cmd.add_option("--cred", credential, "credential file (tracemesh cred issue)")
      ->envname("TRACEMESH_CREDENTIAL")
      ->required();
  cmd.add_option("-k,--broker-key", broker_key, "the broker's public key (needed for tcp with CURVE and for native://, which is encrypted)")
      ->envname("TRACEMESH_BROKER_KEY");
  cmd.add_flag("--no-curve", no_curve, "plain tcp or native:// in the clear (only for brokers configured with curve = false)");
  cmd.add_option("--connect-timeout", timeout_ms, "connect timeout in ms")->capture_default_str();
}

Result<std::unique_ptr<Client>> ConnectionFlags::connect() const {
  auto id = Identity::load(identity);
  if (!id.ok()) return id.error();
  auto cred = Credential::load(credential);
  if (!cred.ok()) return cred.error();
  ClientOptions o;
  o.url = url;
  o.broker_key = broker_key;
  o.curve = !no_curve;
  o.identity = std::make_shared<Identity>(std::move(*id));
  o.credential = std::make_shared<Credential>(std::move(*cred));
  o.connect_timeout = std::chrono::milliseconds(timeout_ms);
  return Client::connect(std::move(o));
}

}  // namespace tracemesh::cli

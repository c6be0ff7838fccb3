// The C API: a thin adapter over tracemesh::Client.
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>

#include "tracemesh/client.h"
#include "tracemesh/tracemesh.h"
#include "tracemesh/wire/frame.capnp.h"

struct tm_client {
  std::unique_ptr<tracemesh::Client> client;
  std::mutex mu;
  // Requests being handled, so tm_reply can find the original Message.
  std::unordered_map<const tm_message*, const tracemesh::Message*> in_handler;
};

namespace {

thread_local std::string last_error;

tm_status fail(const tracemesh::Error& e) {
  last_error = e.to_string();
  switch (e.code()) {
    case tracemesh::Errc::ok: return TM_OK;
    case tracemesh::Errc::invalid_argument: return TM_ERR_INVALID_ARGUMENT;
    case tracemesh::Errc::not_found: return TM_ERR_NOT_FOUND;
    case tracemesh::Errc::exists: return TM_ERR_INVALID_ARGUMENT;
    case tracemesh::Errc::timeout: return TM_ERR_TIMEOUT;
    case tracemesh::Errc::no_responders: return TM_ERR_NO_RESPONDERS;
    case tracemesh::Errc::unauthenticated: return TM_ERR_UNAUTHENTICATED;
    case tracemesh::Errc::revoked: return TM_ERR_REVOKED;
    case tracemesh::Errc::permission_denied: return TM_ERR_PERMISSION_DENIED;
    case tracemesh::Errc::disconnected: return TM_ERR_DISCONNECTED;
    case tracemesh::Errc::overloaded: return TM_ERR_OVERLOADED;
    case tracemesh::Errc::protocol: return TM_ERR_PROTOCOL;
    case tracemesh::Errc::storage_full: return TM_ERR_STORAGE_FULL;
    case tracemesh::Errc::too_large: return TM_ERR_TOO_LARGE;
    case tracemesh::Errc::io: return TM_ERR_IO;
    case tracemesh::Errc::internal: return TM_ERR_INTERNAL;
  }
  return TM_ERR_INTERNAL;
}

tm_status invalid(const char* why) {
  last_error = std::string("invalid_argument: ") + why;
  return TM_ERR_INVALID_ARGUMENT;
}

tm_message to_c(const tracemesh::Message& m) {
  tm_message c{};
  c.topic = m.topic().data();
  c.topic_len = m.topic().size();
  c.payload = m.payload().data();
  c.payload_len = m.payload().size();
  c.producer = m.producer().data();
  c.producer_len = m.producer().size();
  c.sequence = m.sequence();
  c.published_at_ns = m.published_at_ns();
  c.id_hi = m.id().hi;
  c.id_lo = m.id().lo;
  return c;
}

}  // namespace

extern "C" {

tm_status tm_connect(const tm_connect_options* options, tm_client** out) {
  if (!options || !out) return invalid("options and out are required");
  *out = nullptr;
  if (!options->url || !options->identity_path || !options->credential_path)
    return invalid("url, identity_path and credential_path are required");
  auto id = tracemesh::Identity::load(options->identity_path);
  if (!id.ok()) return fail(id.error());
  auto cred = tracemesh::Credential::load(options->credential_path);
  if (!cred.ok()) return fail(cred.error());
  tracemesh::ClientOptions o;
  o.url = options->url;
  if (options->broker_key) o.broker_key = options->broker_key;
  o.curve = options->curve != 0;
  o.identity = std::make_shared<tracemesh::Identity>(std::move(*id));
  o.credential = std::make_shared<tracemesh::Credential>(std::move(*cred));
  if (options->connect_timeout_ms > 0) o.connect_timeout = std::chrono::milliseconds(options->connect_timeout_ms);
  auto client = tracemesh::Client::connect(std::move(o));
  if (!client.ok()) return fail(client.error());
  auto* c = new tm_client;
  c->client = std::move(*client);
  *out = c;
  return TM_OK;
}

tm_status tm_publish(tm_client* client, const char* topic, const void* payload, size_t len, unsigned flags) {
  if (!client || !topic || (!payload && len)) return invalid("client, topic and payload are required");
  tracemesh::PublishOptions opts;
  opts.retain = flags & TM_PUBLISH_RETAIN;
  std::string_view body(static_cast<const char*>(payload), len);
  if (flags & TM_PUBLISH_DURABLE) {
    auto ack = client->client->publish_durable(topic, body, opts).get();
    return ack.ok() ? TM_OK : fail(ack.error());
  }
  auto s = client->client->publish(topic, body, opts);
  return s.ok() ? TM_OK : fail(s.error());
}

tm_status tm_subscribe(tm_client* client, const char* filter, const char* queue_group, tm_handler handler,
                       void* user_data, uint64_t* subscription_out) {
  if (!client || !filter || !handler) return invalid("client, filter and handler are required");
  tracemesh::SubscribeOptions opts;
  if (queue_group) opts.queue_group = queue_group;
  auto sub = client->client->subscribe(filter, [client, handler, user_data](const tracemesh::Message& m) {
    tm_message c = to_c(m);
    {
      std::lock_guard lock(client->mu);
      client->in_handler[&c] = &m;
    }
    handler(&c, user_data);
    std::lock_guard lock(client->mu);
    client->in_handler.erase(&c);
  }, opts);
  if (!sub.ok()) return fail(sub.error());
  if (subscription_out) *subscription_out = *sub;
  return TM_OK;
}

tm_status tm_unsubscribe(tm_client* client, uint64_t subscription) {
  if (!client) return invalid("client is required");
  auto s = client->client->unsubscribe(subscription);
  return s.ok() ? TM_OK : fail(s.error());
}

tm_status tm_request(tm_client* client, const char* topic, const void* payload, size_t len, int timeout_ms,
                     void** reply_out, size_t* reply_len) {
  if (!client || !topic || !reply_out || !reply_len || (!payload && len))
    return invalid("client, topic, reply_out and reply_len are required");
  *reply_out = nullptr;
  *reply_len = 0;
  auto reply = client->client->request(topic, std::string_view(static_cast<const char*>(payload), len),
                                       std::chrono::milliseconds(timeout_ms > 0 ? timeout_ms : 5000));
  if (!reply.ok()) return fail(reply.error());
  const auto body = reply->payload();
  void* copy = std::malloc(body.size() ? body.size() : 1);
  if (!copy) return fail(tracemesh::Error(tracemesh::Errc::internal, "out of memory"));
  std::memcpy(copy, body.data(), body.size());
  *reply_out = copy;
  *reply_len = body.size();
  return TM_OK;
}

tm_status tm_reply(tm_client* client, const tm_message* request, const void* payload, size_t len) {
  if (!client || !request || (!payload && len)) return invalid("client, request and payload are required");
  const tracemesh::Message* original = nullptr;
  {
    std::lock_guard lock(client->mu);
    auto it = client->in_handler.find(request);
    if (it != client->in_handler.end()) original = it->second;
  }
  if (!original) return invalid("tm_reply must be called inside the handler with the message it was given");
  auto s = client->client->reply(*original, std::string_view(static_cast<const char*>(payload), len));
  return s.ok() ? TM_OK : fail(s.error());
}

tm_status tm_flush(tm_client* client, int timeout_ms) {
  if (!client) return invalid("client is required");
  auto s = client->client->flush(std::chrono::milliseconds(timeout_ms > 0 ? timeout_ms : 10000));
  return s.ok() ? TM_OK : fail(s.error());
}

void tm_close(tm_client* client) {
  if (!client) return;
  client->client->close(std::chrono::milliseconds(5000));
  delete client;
}

void tm_free(void* pointer) { std::free(pointer); }

const char* tm_last_error(void) { return last_error.c_str(); }

int tm_protocol_version(void) { return tracemesh::wire::PROTOCOL_VERSION; }

}  // extern "C"

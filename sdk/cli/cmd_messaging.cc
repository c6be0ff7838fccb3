// pub, sub, req, reply, stream, stats.
#include <atomic>
#include <csignal>
#include <cstdio>
#include <iostream>
#include <thread>

#include "commands.h"
#include "connection.h"

namespace tracemesh::cli {
namespace {

std::atomic<bool> interrupted{false};

void on_signal(int) { interrupted = true; }

std::string json_escape(std::string_view s) {
  std::string out;
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out;
}

// ["a","b"]
std::string json_strings(const std::vector<std::string>& items) {
  std::string out = "[";
  for (const auto& i : items) out += (out.size() > 1 ? ",\"" : "\"") + json_escape(i) + "\"";
  return out + "]";
}

// "a, b", or "-" for none.
std::string joined(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& i : items) out += (out.empty() ? "" : ", ") + i;
  return out.empty() ? "-" : out;
}

void print_message(const Message& m, bool json) {
  if (json) {
    std::string parents;
    for (const auto& p : m.parents()) parents += (parents.empty() ? "\"" : ",\"") + p.to_string() + "\"";
    const std::string path = json_strings(std::vector<std::string>(m.path().begin(), m.path().end()));
    std::printf(
        "{\"topic\":\"%s\",\"id\":\"%s\",\"producer\":\"%s\",\"sequence\":%llu,\"published_at_ns\":%lld,"
        "\"parents\":[%s],\"path\":%s,\"stream_seq\":%llu,\"payload\":\"%s\"}\n",
        json_escape(m.topic()).c_str(), m.id().to_string().c_str(), json_escape(m.producer()).c_str(),
        static_cast<unsigned long long>(m.sequence()), static_cast<long long>(m.published_at_ns()),
        parents.c_str(), path.c_str(), static_cast<unsigned long long>(m.stream_seq()),
        json_escape(m.payload()).c_str());
  } else {
    std::printf("[%.*s] %.*s\n", static_cast<int>(m.topic().size()), m.topic().data(),
                static_cast<int>(m.payload().size()), m.payload().data());
  }
  std::fflush(stdout);
}

void print_stream(const StreamInfo& s, bool json) {
  if (json) {
    std::string subjects;
    for (const auto& x : s.config.subjects) subjects += (subjects.empty() ? "\"" : ",\"") + json_escape(x) + "\"";
    std::string consumers;
    for (const auto& c : s.consumers)
      consumers += (consumers.empty() ? "" : ",") + std::string("{\"name\":\"") + json_escape(c.name) +
                   "\",\"ack_floor\":" + std::to_string(c.ack_floor) + ",\"pending\":" +
                   std::to_string(c.pending) + ",\"redelivered\":" + std::to_string(c.redelivered) + "}";
    std::printf("{\"name\":\"%s\",\"subjects\":[%s],\"messages\":%llu,\"bytes\":%llu,\"first_seq\":%llu,"
                "\"last_seq\":%llu,\"consumers\":[%s]}\n",
                json_escape(s.config.name).c_str(), subjects.c_str(),
                static_cast<unsigned long long>(s.messages), static_cast<unsigned long long>(s.bytes),
                static_cast<unsigned long long>(s.first_seq), static_cast<unsigned long long>(s.last_seq),
                consumers.c_str());
    return;
  }
  std::string subjects;
  for (const auto& x : s.config.subjects) subjects += (subjects.empty() ? "" : ", ") + x;
  std::printf("stream %s\n  subjects:  %s\n  messages:  %llu (%llu bytes)\n  sequence:  %llu..%llu\n",
              s.config.name.c_str(), subjects.c_str(), static_cast<unsigned long long>(s.messages),
              static_cast<unsigned long long>(s.bytes), static_cast<unsigned long long>(s.first_seq),
              static_cast<unsigned long long>(s.last_seq));
  for (const auto& c : s.consumers)
    std::printf("  consumer %s: ack floor %llu, pending %llu, redelivered %llu\n", c.name.c_str(),
                static_cast<unsigned long long>(c.ack_floor), static_cast<unsigned long long>(c.pending),
                static_cast<unsigned long long>(c.redelivered));
}

}  // namespace

void add_messaging_commands(CLI::App& app, Context& ctx) {
  // pub
  {
    auto* cmd = app.add_subcommand("pub", "publish a message (payload from the argument or stdin)");
    auto flags = std::make_shared<ConnectionFlags>();
    flags->add_to(*cmd);
    auto topic = std::make_shared<std::string>();
    auto payload = std::make_shared<std::string>();
    auto durable = std::make_shared<bool>(false);
    auto retain = std::make_shared<bool>(false);
    auto count = std::make_shared<int>(1);
    cmd->add_option("topic", *topic, "topic to publish on")->required();
    cmd->add_option("payload", *payload, "payload; read from stdin when omitted");
    cmd->add_flag("--durable", *durable, "wait until the broker has stored the message on disk");
    cmd->add_flag("--retain", *retain, "the broker keeps it as the topic's last value");
    cmd->add_option("-n,--count", *count, "publish the payload this many times")->check(CLI::PositiveNumber);
    cmd->callback([=, &ctx] {
      if (cmd->count("payload") == 0) {
        payload->assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
      }
      auto client = flags->connect();
      if (!client.ok()) { ctx.exit_code = report("pub: connect", client.error()); return; }
      PublishOptions opts;
      opts.retain = *retain;
      for (int i = 0; i < *count; ++i) {
        if (*durable) {
          auto ack = (*client)->publish_durable(*topic, *payload, opts).get();
          if (!ack.ok()) { ctx.exit_code = report("pub", ack.error()); return; }
          if (ack->stream_seq)
            std::printf("stored as seq %llu%s\n", static_cast<unsigned long long>(ack->stream_seq),
                        ack->duplicate ? " (duplicate)" : "");
          else  // no stream at this broker: a link's outbox has it on disk
            std::printf("stored for forwarding (in a link's outbox)%s\n", ack->duplicate ? " (duplicate)" : "");
        } else if (auto s = (*client)->publish(*topic, *payload, opts); !s.ok()) {
          ctx.exit_code = report("pub", s.error());
          return;
        }
      }
      if (auto s = (*client)->flush(); !s.ok()) ctx.exit_code = report("pub: flush", s.error());
    });
  }
  // sub
  {
    auto* cmd = app.add_subcommand("sub", "subscribe and print messages until interrupted or --count is reached");
    auto flags = std::make_shared<ConnectionFlags>();
    flags->add_to(*cmd);
    auto pattern = std::make_shared<std::string>();
    auto group = std::make_shared<std::string>();
    auto stream = std::make_shared<std::string>();
    auto consumer = std::make_shared<std::string>();
    auto count = std::make_shared<int>(0);
    auto json = std::make_shared<bool>(false);
    auto timeout = std::make_shared<int>(0);
    cmd->add_option("pattern", *pattern, "topic filter; + matches one level, # the rest");
    cmd->add_option("-q,--queue", *group, "queue group: each message goes to one member");
    cmd->add_option("--stream", *stream, "consume a durable stream instead (with --consumer)");
    cmd->add_option("--consumer", *consumer, "durable consumer name (position survives restarts)");
    cmd->add_option("-n,--count", *count, "exit after this many messages");
    cmd->add_option("--timeout", *timeout, "exit with code 3 after this many ms without --count reached");
    cmd->add_flag("--json", *json, "one JSON object per message");
    cmd->callback([=, &ctx] {
      if (pattern->empty() == stream->empty()) {
        std::fprintf(stderr, "tracemesh: sub: give a topic pattern or --stream NAME --consumer NAME\n");
        ctx.exit_code = 2;
        return;
      }
      auto client = flags->connect();
      if (!client.ok()) { ctx.exit_code = report("sub: connect", client.error()); return; }
      std::atomic<int> received{0};
      auto handler = [&](const Message& m) {
        if (*count && received >= *count) return;
        print_message(m, *json);
        m.ack();
        ++received;
      };
      Result<uint64_t> sub = stream->empty()
                                 ? (*client)->subscribe(*pattern, handler, SubscribeOptions{*group})
                                 : (*client)->consume(*stream, consumer->empty() ? "cli" : *consumer, handler);
      if (!sub.ok()) { ctx.exit_code = report("sub", sub.error()); return; }
      std::signal(SIGINT, on_signal);
      std::signal(SIGTERM, on_signal);
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(*timeout);
      while (!interrupted && (*count == 0 || received < *count)) {
        if (*timeout && std::chrono::steady_clock::now() > deadline) {
          std::fprintf(stderr, "tracemesh: sub: %d of %d messages within %d ms\n", received.load(), *count, *timeout);
          ctx.exit_code = 3;
          break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      (*client)->close(std::chrono::milliseconds(2000));
    });
  }
  // req
  {
    auto* cmd = app.add_subcommand("req", "send a request and print the reply");
    auto flags = std::make_shared<ConnectionFlags>();
    flags->add_to(*cmd);
    auto topic = std::make_shared<std::string>();
    auto payload = std::make_shared<std::string>();
    auto timeout = std::make_shared<int>(2000);
    cmd->add_option("topic", *topic, "topic a responder listens on")->required();
    cmd->add_option("payload", *payload, "request payload");
    cmd->add_option("-t,--timeout", *timeout, "ms to wait for the reply")->capture_default_str();
    cmd->callback([=, &ctx] {
      auto client = flags->connect();
      if (!client.ok()) { ctx.exit_code = report("req: connect", client.error()); return; }
      auto reply = (*client)->request(*topic, *payload, std::chrono::milliseconds(*timeout));
      if (!reply.ok()) { ctx.exit_code = report("req", reply.error()); return; }
      std::printf("%.*s\n", static_cast<int>(reply->payload().size()), reply->payload().data());
    });
  }
  // reply (a simple responder, handy for scripts and tests)
  {
    auto* cmd = app.add_subcommand("reply", "answer requests on a topic with a fixed payload");
    auto flags = std::make_shared<ConnectionFlags>();
    flags->add_to(*cmd);
    auto topic = std::make_shared<std::string>();
    auto payload = std::make_shared<std::string>();
    auto count = std::make_shared<int>(0);
    auto group = std::make_shared<std::string>();
    cmd->add_option("topic", *topic, "topic filter to answer on")->required();
    cmd->add_option("payload", *payload, "reply payload")->required();
    cmd->add_option("-n,--count", *count, "exit after answering this many");
    cmd->add_option("-q,--queue", *group, "queue group");
    cmd->callback([=, &ctx] {
      auto client = flags->connect();
      if (!client.ok()) { ctx.exit_code = report("reply: connect", client.error()); return; }
      std::atomic<int> answered{0};
      Client* c = client->get();
      auto sub = c->subscribe(*topic, [&](const Message& m) {
        if (c->reply(m, *payload).ok()) ++answered;
      }, SubscribeOptions{*group});
      if (!sub.ok()) { ctx.exit_code = report("reply", sub.error()); return; }
      std::signal(SIGINT, on_signal);
      std::signal(SIGTERM, on_signal);
      while (!interrupted && (*count == 0 || answered < *count))
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      (*client)->close(std::chrono::milliseconds(2000));
    });
  }
  // stream
  {
    auto* stream = app.add_subcommand("stream", "manage durable streams");
    stream->require_subcommand(1);
    auto flags = std::make_shared<ConnectionFlags>();
    auto json = std::make_shared<bool>(false);
    auto* create = stream->add_subcommand("create", "create (or update) a stream");
    flags->add_to(*create);
    auto config = std::make_shared<StreamConfig>();
    create->add_option("name", config->name, "stream name")->required();
    create->add_option("-s,--subjects", config->subjects, "topic filters the stream stores")->required();
    create->add_option("--max-messages", config->max_messages, "keep at most this many (0 = unlimited)");
    create->add_option("--max-bytes", config->max_bytes, "keep at most this many bytes");
    create->add_option("--max-age-ms", config->max_age_ms, "drop messages older than this");
    create->add_flag("--json", *json, "print JSON");
    create->callback([=, &ctx] {
      auto client = flags->connect();
      if (!client.ok()) { ctx.exit_code = report("stream create: connect", client.error()); return; }
      auto info = (*client)->stream_create(*config);
      if (!info.ok()) { ctx.exit_code = report("stream create", info.error()); return; }
      print_stream(*info, *json);
    });
    auto flags_ls = std::make_shared<ConnectionFlags>();
    auto* ls = stream->add_subcommand("ls", "list streams");
    flags_ls->add_to(*ls);
    ls->add_flag("--json", *json, "print JSON, one object per line");
    ls->callback([=, &ctx] {
      auto client = flags_ls->connect();
      if (!client.ok()) { ctx.exit_code = report("stream ls: connect", client.error()); return; }
      auto list = (*client)->stream_list();
      if (!list.ok()) { ctx.exit_code = report("stream ls", list.error()); return; }
      if (!*json) std::printf("%-20s %12s %14s %10s\n", "NAME", "MESSAGES", "BYTES", "CONSUMERS");
      for (const auto& s : *list) {
        if (*json) print_stream(s, true);
        else
          std::printf("%-20s %12llu %14llu %10zu\n", s.config.name.c_str(),
                      static_cast<unsigned long long>(s.messages), static_cast<unsigned long long>(s.bytes),
                      s.consumers.size());
      }
    });
    auto flags_info = std::make_shared<ConnectionFlags>();
    auto* info = stream->add_subcommand("info", "show a stream and its consumers");
    flags_info->add_to(*info);
    auto name = std::make_shared<std::string>();
    info->add_option("name", *name, "stream name")->required();
    info->add_flag("--json", *json, "print JSON");
    info->callback([=, &ctx] {
      auto client = flags_info->connect();
      if (!client.ok()) { ctx.exit_code = report("stream info: connect", client.error()); return; }
      auto s = (*client)->stream_info(*name);
      if (!s.ok()) { ctx.exit_code = report("stream info", s.error()); return; }
      print_stream(*s, *json);
    });
  }
  // mesh status
  {
    auto* mesh = app.add_subcommand("mesh", "the federated mesh as one broker sees it");
    mesh->require_subcommand(1);
    auto* status = mesh->add_subcommand("status", "tier, site, links, link state, backlog, RTT and throughput");
    auto flags = std::make_shared<ConnectionFlags>();
    flags->add_to(*status);
    auto json = std::make_shared<bool>(false);
    status->add_flag("--json", *json, "print one JSON object");
    status->callback([=, &ctx] {
      auto client = flags->connect();
      if (!client.ok()) { ctx.exit_code = report("mesh status: connect", client.error()); return; }
      auto m = (*client)->mesh_status();
      if (!m.ok()) { ctx.exit_code = report("mesh status", m.error()); return; }
      if (*json) {
        std::string links;
        for (const auto& l : m->links) {
          char buf[1024];
          std::snprintf(buf, sizeof buf,
                        "%s{\"name\":\"%s\",\"peer\":\"%s\",\"peer_tier\":\"%s\",\"peer_site\":\"%s\","
                        "\"direction\":\"%s\",\"endpoint\":\"%s\",\"state\":\"%s\",\"backlog_messages\":%llu,"
                        "\"backlog_bytes\":%llu,\"dropped\":%llu,\"rtt_us\":%llu,\"msgs_per_sec\":%.1f,"
                        "\"bytes_per_sec\":%.1f,\"forwarded\":%llu,\"received\":%llu,\"last_error\":\"%s\",",
                        links.empty() ? "" : ",", json_escape(l.name).c_str(), json_escape(l.peer).c_str(),
                        json_escape(l.peer_tier).c_str(), json_escape(l.peer_site).c_str(), l.direction.c_str(),
                        json_escape(l.endpoint).c_str(), l.state.c_str(),
                        static_cast<unsigned long long>(l.backlog_messages),
                        static_cast<unsigned long long>(l.backlog_bytes), static_cast<unsigned long long>(l.dropped),
                        static_cast<unsigned long long>(l.rtt_us), l.msgs_per_sec, l.bytes_per_sec,
                        static_cast<unsigned long long>(l.forwarded), static_cast<unsigned long long>(l.received),
                        json_escape(l.last_error).c_str());
          links += buf;
          links += "\"security\":\"" + json_escape(l.security) + "\",\"interest\":" + json_strings(l.interest) +
                   ",\"peer_interest\":" + json_strings(l.peer_interest) + "}";
        }
        std::printf("{\"broker\":\"%s\",\"tier\":\"%s\",\"site\":\"%s\",\"region\":\"%s\","
                    "\"duplicates_dropped\":%llu,\"loops_cut\":%llu,\"links\":[%s]}\n",
                    json_escape(m->broker).c_str(), json_escape(m->tier).c_str(), json_escape(m->site).c_str(),
                    json_escape(m->region).c_str(), static_cast<unsigned long long>(m->duplicates_dropped),
                    static_cast<unsigned long long>(m->loops_cut), links.c_str());
        return;
      }
      std::printf("broker %s: tier %s, site %s, region %s; duplicates dropped %llu, loops cut %llu\n",
                  m->broker.c_str(), m->tier.empty() ? "-" : m->tier.c_str(), m->site.empty() ? "-" : m->site.c_str(),
                  m->region.empty() ? "-" : m->region.c_str(), static_cast<unsigned long long>(m->duplicates_dropped),
                  static_cast<unsigned long long>(m->loops_cut));
      std::printf("%-14s %-9s %-14s %-10s %-11s %10s %12s %9s %12s\n", "LINK", "DIR", "PEER", "PEER TIER", "STATE",
                  "BACKLOG", "BACKLOG B", "RTT us", "MSG/S");
      for (const auto& l : m->links) {
        std::printf("%-14s %-9s %-14s %-10s %-11s %10llu %12llu %9llu %12.0f\n", l.name.c_str(),
                    l.direction.c_str(), l.peer.empty() ? "-" : l.peer.c_str(),
                    l.peer_tier.empty() ? "-" : l.peer_tier.c_str(), l.state.c_str(),
                    static_cast<unsigned long long>(l.backlog_messages),
                    static_cast<unsigned long long>(l.backlog_bytes), static_cast<unsigned long long>(l.rtt_us),
                    l.msgs_per_sec);
        if (!l.last_error.empty()) std::printf("  last error: %s\n", l.last_error.c_str());
        std::printf("  security:      %s\n", l.security.empty() ? "-" : l.security.c_str());
        std::printf("  interest:      %s\n", joined(l.interest).c_str());
        std::printf("  peer interest: %s\n", joined(l.peer_interest).c_str());
      }
    });
  }
  // stats
  {
    auto* cmd = app.add_subcommand("stats", "broker counters: messages, drops of slow consumers, malformed frames");
    auto flags = std::make_shared<ConnectionFlags>();
    flags->add_to(*cmd);
    cmd->callback([=, &ctx] {
      auto client = flags->connect();
      if (!client.ok()) { ctx.exit_code = report("stats: connect", client.error()); return; }
      auto s = (*client)->stats();
      if (!s.ok()) { ctx.exit_code = report("stats", s.error()); return; }
      std::printf("broker %s, up %llu ms\nclients %u, subscriptions %u\nmessages in %llu, out %llu\n"
                  "bytes in %llu, out %llu\nslow consumer drops %llu\nmalformed frames %llu\n"
                  "duplicates dropped %llu\nauth failures %u\n",
                  s->broker_name.c_str(), static_cast<unsigned long long>(s->uptime_ms), s->clients,
                  s->subscriptions, static_cast<unsigned long long>(s->messages_in),
                  static_cast<unsigned long long>(s->messages_out), static_cast<unsigned long long>(s->bytes_in),
                  static_cast<unsigned long long>(s->bytes_out),
                  static_cast<unsigned long long>(s->slow_consumer_drops),
                  static_cast<unsigned long long>(s->malformed_frames),
                  static_cast<unsigned long long>(s->duplicates_dropped), s->auth_failures);
      for (const auto& c : s->client_stats)
        std::printf("  client %s: out %llu, drops %llu, queued %llu bytes\n", c.name.c_str(),
                    static_cast<unsigned long long>(c.messages_out), static_cast<unsigned long long>(c.drops),
                    static_cast<unsigned long long>(c.queued_bytes));
    });
  }
}

}  // namespace tracemesh::cli

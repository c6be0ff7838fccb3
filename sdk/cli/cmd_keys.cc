// `tracemesh keygen` and `tracemesh cred issue|show`: identities and operator credentials.
#include <charconv>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "iso_time.h"
#include "commands.h"
#include "tracemesh/identity.h"

namespace tracemesh::cli {
namespace {

constexpr int64_t kMsPerDay = 24LL * 3600 * 1000;
// Longest accepted --expires; beyond this "never" says what is meant.
constexpr int64_t kMaxLifetimeMs = int64_t{100} * 366 * kMsPerDay;

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}


// Parses a lifetime such as "30d", "12h", "90m", "45s" into milliseconds; "never" is 0.
// Returns nullopt for anything else, including zero and lifetimes over kMaxLifetimeMs.
std::optional<int64_t> parse_lifetime(std::string_view text) {
  if (text == "never") return 0;
  if (text.size() < 2) return std::nullopt;
  int64_t unit_ms = 0;
  switch (text.back()) {
    case 's': unit_ms = 1'000; break;
    case 'm': unit_ms = 60'000; break;
    case 'h': unit_ms = 3'600'000; break;
    case 'd': unit_ms = kMsPerDay; break;
    default: return std::nullopt;
  }
  std::string_view digits = text.substr(0, text.size() - 1);
  int64_t count = 0;
  auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), count);
  if (ec != std::errc() || end != digits.data() + digits.size() || count <= 0 ||
      count > kMaxLifetimeMs / unit_ms) {
    return std::nullopt;
  }
  return count * unit_ms;
}

CLI::Validator lifetime_validator() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        if (parse_lifetime(text)) return {};
        return "expected a lifetime like 30d, 12h, 90m or 45s (at most 100 years), or \"never\"; "
               "got \"" +
               text + "\"";
      },
      "");
}

// A public key given on the command line: base64url text, or the path of an identity file
// whose public key is meant.
Result<PublicKey> resolve_public_key(const std::string& flag, const std::string& arg) {
  auto key = decode_key(arg);
  if (key.ok()) return key;
  std::error_code ec;
  if (!std::filesystem::exists(arg, ec)) {
    return Error(Errc::invalid_argument,
                 flag + ": no such identity file, and not a public key: " + key.error().message());
  }
  auto identity = Identity::load(arg);
  if (!identity.ok()) return identity.error();
  return identity->public_key();
}

// `s` with control characters shown as \xNN, so a hostile credential cannot drive the terminal.
std::string printable(std::string_view s) {
  std::string out;
  for (unsigned char c : s) {
    if (c < 0x20 || c == 0x7f) {
      char buf[5];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

// Length of the valid UTF-8 sequence starting at s[i], or 0 if there is none.
size_t utf8_sequence_length(std::string_view s, size_t i) {
  auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  unsigned char c = byte(i);
  size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
  if (n == 0 || i + n > s.size()) return 0;
  uint32_t cp = n == 1 ? c : c & (0x7f >> n);
  for (size_t k = 1; k < n; ++k) {
    if ((byte(i + k) & 0xc0) != 0x80) return 0;
    cp = (cp << 6) | (byte(i + k) & 0x3f);
  }
  static constexpr uint32_t kMinForLength[] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < kMinForLength[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
  return n;
}

// A JSON string literal for `s`; bytes that are not valid UTF-8 become U+FFFD.
std::string json_string(std::string_view s) {
  std::string out = "\"";
  for (size_t i = 0; i < s.size();) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    size_t n = utf8_sequence_length(s, i);
    if (n == 0) {
      out += "\\ufffd";
      ++i;
      continue;
    }
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7f) {
      char buf[7];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out.append(s.substr(i, n));
    }
    i += n;
  }
  out += '"';
  return out;
}

std::string or_dash(const std::string& s) { return s.empty() ? "-" : printable(s); }

void print_text(const CredentialClaims& c, const std::optional<Status>& verdict) {
  std::string roles;
  for (const std::string& role : c.roles) roles += (roles.empty() ? "" : ", ") + printable(role);
  std::printf("id:       %s\n", c.id.c_str());
  std::printf("name:     %s\n", or_dash(c.name).c_str());
  std::printf("subject:  %s\n", encode_key(c.subject).c_str());
  std::printf("roles:    %s\n", roles.empty() ? "-" : roles.c_str());
  std::printf("tenant:   %s\n", or_dash(c.tenant).c_str());
  std::printf("site:     %s\n", or_dash(c.site).c_str());
  std::printf("tier:     %s\n", c.tier.empty() ? "- (client)" : printable(c.tier).c_str());
  std::printf("issued:   %s\n", iso_time(c.issued_at_ms).c_str());
  std::printf("expires:  %s\n", c.expires_at_ms == 0 ? "never" : iso_time(c.expires_at_ms).c_str());
  std::printf("issuer:   %s\n", encode_key(c.issuer).c_str());
  if (verdict) {
    std::printf(
        "status:   %s\n",
        verdict->ok() ? "valid" : ("invalid: " + printable(verdict->error().message())).c_str());
  }
}

void print_json(const CredentialClaims& c, const std::optional<Status>& verdict) {
  std::string roles = "[";
  for (size_t i = 0; i < c.roles.size(); ++i) {
    roles += (i ? "," : "") + json_string(c.roles[i]);
  }
  roles += "]";
  std::string out = "{";
  out += "\"id\":" + json_string(c.id);
  out += ",\"name\":" + json_string(c.name);
  out += ",\"subject\":" + json_string(encode_key(c.subject));
  out += ",\"roles\":" + roles;
  out += ",\"tenant\":" + json_string(c.tenant);
  out += ",\"site\":" + json_string(c.site);
  out += ",\"tier\":" + json_string(c.tier);
  out += ",\"issued\":" + json_string(iso_time(c.issued_at_ms));
  out += ",\"issued_at_ms\":" + std::to_string(c.issued_at_ms);
  out += ",\"expires\":" + (c.expires_at_ms == 0 ? "null" : json_string(iso_time(c.expires_at_ms)));
  out += ",\"expires_at_ms\":" + std::to_string(c.expires_at_ms);
  out += ",\"issuer\":" + json_string(encode_key(c.issuer));
  if (verdict) {
    out += std::string(",\"valid\":") + (verdict->ok() ? "true" : "false");
    if (!verdict->ok()) out += ",\"reason\":" + json_string(verdict->error().message());
  }
  out += "}\n";
  std::fputs(out.c_str(), stdout);
}

void add_keygen(CLI::App& app, Context& ctx) {
  struct Options {
    std::string out;
    bool force = false;
  };
  auto opts = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("keygen", "Create a new identity and print its public key");
  cmd->footer(
      "An identity is an Ed25519 key pair for a broker, device, client or operator. FILE holds\n"
      "the secret key and is written with mode 0600. Only the public key is printed on stdout,\n"
      "so scripts can capture it: give it to whoever configures trust or issues credentials.");
  cmd->add_option("--out,-o", opts->out, "Identity file to write")->required()->type_name("FILE");
  cmd->add_flag("--force,-f", opts->force, "Overwrite FILE if it already exists");
  cmd->callback([opts, &ctx] {
    std::error_code ec;
    if (!opts->force && std::filesystem::symlink_status(opts->out, ec).type() !=
                            std::filesystem::file_type::not_found) {
      ctx.exit_code = report(
          "keygen", Error(Errc::exists, opts->out + " already exists; refusing to overwrite an "
                                                    "identity (pass --force to replace it)"));
      return;
    }
    Identity identity = Identity::generate();
    if (Status st = identity.save(opts->out); !st.ok()) {
      ctx.exit_code = report("keygen", st.error());
      return;
    }
    std::printf("%s\n", encode_key(identity.public_key()).c_str());
  });
}

void add_cred_issue(CLI::App& cred, Context& ctx) {
  struct Options {
    std::string operator_file;
    std::string subject;
    std::string name;
    std::vector<std::string> roles;
    std::string tenant;
    std::string site;
    std::string tier;
    std::string expires = "365d";
    std::string out;
  };
  auto opts = std::make_shared<Options>();
  CLI::App* cmd =
      cred.add_subcommand("issue", "Sign a credential for a principal with an operator key");
  cmd->footer(
      "Brokers that trust the operator's public key accept the subject's key with the name,\n"
      "roles, tenant, site and tier given here until the credential expires. The credential\n"
      "is not secret; hand FILE to the principal.");
  cmd->add_option("--operator", opts->operator_file, "Operator identity file (signs)")
      ->required()
      ->type_name("OPKEYFILE");
  cmd->add_option("--subject", opts->subject,
                  "The principal: its public key (base64url), or its identity file")
      ->required()
      ->type_name("PUBKEY|FILE");
  cmd->add_option("--name", opts->name, "Principal name shown in logs and audit, e.g. press-7")
      ->required();
  cmd->add_option("--role", opts->roles, "Role granted; repeat for several")
      ->type_name("ROLE")
      ->allow_extra_args(false);
  cmd->add_option("--tenant", opts->tenant, "Tenant the principal belongs to");
  cmd->add_option("--site", opts->site, "Site the principal runs at");
  cmd->add_option("--tier", opts->tier, "Placement tier for brokers; omit for clients")
      ->type_name("TIER")
      ->check(CLI::IsMember({"device", "edge", "regional", "centre"}));
  cmd->add_option("--expires", opts->expires,
                  "Lifetime from now: e.g. 30d, 12h, 90m, 45s, or \"never\"")
      ->type_name("DURATION")
      ->check(lifetime_validator())
      ->capture_default_str();
  cmd->add_option("--out,-o", opts->out, "Credential file to write (armored text)")
      ->required()
      ->type_name("FILE");
  cmd->callback([opts, &ctx] {
    auto op = Identity::load(opts->operator_file);
    if (!op.ok()) {
      ctx.exit_code = report("cred issue: --operator", op.error());
      return;
    }
    auto subject = resolve_public_key("--subject", opts->subject);
    if (!subject.ok()) {
      ctx.exit_code = report("cred issue", subject.error());
      return;
    }
    CredentialClaims claims;
    claims.subject = *subject;
    claims.name = opts->name;
    claims.roles = opts->roles;
    claims.tenant = opts->tenant;
    claims.site = opts->site;
    claims.tier = opts->tier;
    int64_t lifetime = parse_lifetime(opts->expires).value_or(0);  // validated by kLifetime
    claims.expires_at_ms = lifetime == 0 ? 0 : now_ms() + lifetime;
    Credential cred = Credential::issue(*op, std::move(claims));
    if (Status st = cred.save(opts->out); !st.ok()) {
      ctx.exit_code = report("cred issue", st.error());
      return;
    }
    const CredentialClaims& c = cred.claims();
    std::printf(
        "issued credential %s for %s (expires %s) to %s\n", c.id.c_str(), printable(c.name).c_str(),
        c.expires_at_ms == 0 ? "never" : iso_time(c.expires_at_ms).c_str(), opts->out.c_str());
  });
}

void add_cred_show(CLI::App& cred, Context& ctx) {
  struct Options {
    std::string file;
    bool json = false;
    std::vector<std::string> operator_keys;
  };
  auto opts = std::make_shared<Options>();
  CLI::App* cmd = cred.add_subcommand("show", "Print a credential's claims, optionally verify it");
  cmd->footer(
      "With --operator-key, also checks the credential as a broker would (signature, trusted\n"
      "issuer, expiry): prints \"valid\" or the reason it is not, and exits 5 when invalid.");
  cmd->add_option("file", opts->file, "Credential file")->required()->type_name("FILE");
  cmd->add_flag("--json", opts->json, "Print one JSON object instead of text");
  cmd->add_option("--operator-key", opts->operator_keys,
                  "Trusted operator public key (or identity file); repeat for several")
      ->type_name("KEY")
      ->allow_extra_args(false);
  cmd->callback([opts, &ctx] {
    auto cred = Credential::load(opts->file);
    if (!cred.ok()) {
      ctx.exit_code = report("cred show", cred.error());
      return;
    }
    std::optional<Status> verdict;
    if (!opts->operator_keys.empty()) {
      std::vector<PublicKey> trusted;
      for (const std::string& arg : opts->operator_keys) {
        auto key = resolve_public_key("--operator-key", arg);
        if (!key.ok()) {
          ctx.exit_code = report("cred show", key.error());
          return;
        }
        trusted.push_back(*key);
      }
      verdict = cred->verify(trusted, now_ms());
    }
    if (opts->json) {
      print_json(cred->claims(), verdict);
    } else {
      print_text(cred->claims(), verdict);
    }
    if (verdict && !verdict->ok()) ctx.exit_code = 5;  // authentication refused
  });
}

}  // namespace

void add_key_commands(CLI::App& app, Context& ctx) {
  add_keygen(app, ctx);
  CLI::App* cred = app.add_subcommand(
      "cred", "Issue and inspect operator-signed credentials (see `cred issue --help`)");
  cred->require_subcommand(1);
  add_cred_issue(*cred, ctx);
  add_cred_show(*cred, ctx);
}

}  // namespace tracemesh::cli

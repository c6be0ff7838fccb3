#include "admin_http.h"

#include <spdlog/spdlog.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <thread>

namespace tracemesh::broker {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

namespace {

constexpr auto kIoTimeout = std::chrono::seconds(5);     // a client that sends or reads nothing

// One connection: read a request, answer it, close.
class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(tcp::socket socket, AdminHttp& owner) : stream_(std::move(socket)), owner_(owner) {}

  void run() {
    stream_.expires_after(kIoTimeout);
    http::async_read(stream_, buffer_, request_,
                     [self = shared_from_this()](beast::error_code ec, size_t) { self->on_read(ec); });
  }

 private:
  void on_read(beast::error_code ec) {
    if (ec) return;  // closed, timed out or not HTTP: nothing to answer
    const AdminHttp::Response r =
        owner_.respond(std::string(request_.method_string()), std::string(request_.target()));
    response_.result(r.status);
    response_.version(request_.version());
    response_.set(http::field::server, "tracemeshd");
    response_.set(http::field::content_type, r.content_type);
    response_.keep_alive(false);
    response_.body() = r.body;
    response_.prepare_payload();
    stream_.expires_after(kIoTimeout);
    http::async_write(stream_, response_, [self = shared_from_this()](beast::error_code, size_t) {
      beast::error_code ignored;
      self->stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    });
  }

  beast::tcp_stream stream_;
  AdminHttp& owner_;
  beast::flat_buffer buffer_;
  http::request<http::string_body> request_;
  http::response<http::string_body> response_;
};

}  // namespace

struct AdminHttp::Impl {
  asio::io_context io{1};
  tcp::acceptor acceptor{io};
  std::thread thread;

  void accept(AdminHttp& owner) {
    acceptor.async_accept([this, &owner](beast::error_code ec, tcp::socket socket) {
      if (ec == asio::error::operation_aborted) return;
      if (!ec) std::make_shared<Connection>(std::move(socket), owner)->run();
      accept(owner);
    });
  }
};

AdminHttp::AdminHttp() : impl_(std::make_unique<Impl>()), published_at_(std::chrono::steady_clock::now()) {}

Result<std::unique_ptr<AdminHttp>> AdminHttp::start(const std::string& host_port,
                                                    std::chrono::milliseconds stalled_after) {
  const auto colon = host_port.rfind(':');
  if (colon == std::string::npos) return Error(Errc::invalid_argument, "admin http '" + host_port + "': expected HOST:PORT");
  const std::string host = host_port.substr(0, colon), port = host_port.substr(colon + 1);
  std::unique_ptr<AdminHttp> a(new AdminHttp());
  a->stalled_after_ = stalled_after;
  beast::error_code ec;
  tcp::resolver resolver(a->impl_->io);
  auto found = resolver.resolve(host, port, tcp::resolver::numeric_service, ec);
  if (ec || found.empty())
    return Error(Errc::invalid_argument, "admin http '" + host_port + "': cannot resolve '" + host + "': " + ec.message());
  const tcp::endpoint at = found.begin()->endpoint();
  auto& acceptor = a->impl_->acceptor;
  acceptor.open(at.protocol(), ec);
  if (!ec) acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) acceptor.bind(at, ec);
  if (!ec) acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec)
    return Error(Errc::io, "admin http: cannot listen on " + host_port + ": " + ec.message() +
                               " (set [admin] http to another HOST:PORT, or to \"\" for none)");
  const tcp::endpoint bound = acceptor.local_endpoint();
  const std::string address = bound.address().to_string();
  a->url_ = "http://" + (bound.address().is_v6() ? "[" + address + "]" : address) + ":" +
            std::to_string(bound.port());
  a->impl_->accept(*a);
  a->impl_->thread = std::thread([impl = a->impl_.get()] { impl->io.run(); });
  return a;
}

AdminHttp::~AdminHttp() {
  impl_->io.stop();
  if (impl_->thread.joinable()) impl_->thread.join();
}

void AdminHttp::publish(std::string metrics) {
  std::lock_guard lock(mu_);
  metrics_ = std::move(metrics);
  published_at_ = std::chrono::steady_clock::now();
}

AdminHttp::Response AdminHttp::respond(const std::string& method, const std::string& target) {
  const std::string path = target.substr(0, target.find('?'));
  if (path != "/healthz" && path != "/metrics")
    return {404, "text/plain", "not found: " + path + " (try /healthz or /metrics)\n"};
  if (method != "GET" && method != "HEAD") return {405, "text/plain", "only GET and HEAD\n"};
  std::lock_guard lock(mu_);
  if (path == "/metrics") return {200, "text/plain; version=0.0.4; charset=utf-8", metrics_};
  const auto quiet = std::chrono::steady_clock::now() - published_at_;
  if (quiet > stalled_after_)
    return {503, "text/plain",
            "broker loop stalled: no progress for " +
                std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(quiet).count()) + " ms\n"};
  return {200, "text/plain", "ok\n"};
}

}  // namespace tracemesh::broker

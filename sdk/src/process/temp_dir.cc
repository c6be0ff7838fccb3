#include "process/temp_dir.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <system_error>
#include <utility>
#include <vector>

namespace tracemesh::process {

Result<TempDir> TempDir::create(std::string_view prefix) {
  if (prefix.find('/') != std::string_view::npos) {
    return Error(Errc::invalid_argument, "temp dir prefix must not contain '/'");
  }
  std::filesystem::path base = "/tmp";
  if (const char* tmpdir = std::getenv("TMPDIR"); tmpdir != nullptr && *tmpdir != '\0') {
    base = tmpdir;
  }
  std::string pattern = (base / prefix).string() + "XXXXXX";
  std::vector<char> buffer(pattern.begin(), pattern.end());
  buffer.push_back('\0');
  if (::mkdtemp(buffer.data()) == nullptr) {
    return Error(Errc::io, "mkdtemp " + pattern + ": " + std::strerror(errno));
  }
  return TempDir(std::filesystem::path(buffer.data()));
}

TempDir::TempDir(TempDir&& other) noexcept
    : path_(std::exchange(other.path_, {})), keep_(other.keep_) {}

TempDir& TempDir::operator=(TempDir&& other) noexcept {
  if (this != &other) {
    remove();
    path_ = std::exchange(other.path_, {});
    keep_ = other.keep_;
  }
  return *this;
}

TempDir::~TempDir() { remove(); }

void TempDir::remove() {
  if (!path_.empty() && !keep_) {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  path_.clear();
}

}  // namespace tracemesh::process

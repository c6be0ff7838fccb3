// A private directory that is deleted, with everything in it, when its owner goes away.
#pragma once

#include <filesystem>
#include <string>
#include <string_view>

#include "tracemesh/status.h"

namespace tracemesh::process {

class TempDir {
 public:
  // mkdtemp(3) of "<$TMPDIR or /tmp>/<prefix>XXXXXX", mode 0700. Errors: io.
  static Result<TempDir> create(std::string_view prefix = "tracemesh-");

  TempDir(TempDir&& other) noexcept;
  TempDir& operator=(TempDir&& other) noexcept;
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  // Removes the directory recursively unless keep() was called; errors are ignored.
  ~TempDir();

  const std::filesystem::path& path() const { return path_; }
  // path() / name.
  std::filesystem::path file(std::string_view name) const { return path_ / name; }
  // Leaves the directory on disk (e.g. to inspect logs after a failed test).
  void keep() { keep_ = true; }

 private:
  explicit TempDir(std::filesystem::path path) : path_(std::move(path)) {}
  void remove();

  std::filesystem::path path_;  // empty once moved from
  bool keep_ = false;
};

}  // namespace tracemesh::process

// Little-endian encoding for what the core stores (journal records, the
// layer encoding, kind configs): a writer, and a reader that checks every
// bound, so damaged bytes make it fail, never read past the end.
// Strings and float arrays are a u32 count followed by their bytes.
//
// Not thread-safe; one per encoding.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/string_view.h"

namespace normserve::server {

class ByteWriter {
 public:
  template <typename T>
  void Put(T v) {
    char bytes[sizeof(T)];
    std::memcpy(bytes, &v, sizeof(T));
    out_.append(bytes, sizeof(T));
  }
  void Str(absl::string_view s) {
    Put<uint32_t>(static_cast<uint32_t>(s.size()));
    out_.append(s.data(), s.size());
  }
  void Floats(const std::vector<float>& v) {
    Put<uint32_t>(static_cast<uint32_t>(v.size()));
    if (v.empty()) return;  // data() may be null.
    out_.append(reinterpret_cast<const char*>(v.data()),
                v.size() * sizeof(float));
  }
  std::string& out() { return out_; }

 private:
  std::string out_;
};

class ByteReader {
 public:
  explicit ByteReader(absl::string_view in) : in_(in) {}
  // Each returns false, consuming nothing more, when the bytes run out.
  template <typename T>
  bool Get(T* v) {
    if (in_.size() < sizeof(T)) return false;
    std::memcpy(v, in_.data(), sizeof(T));
    in_.remove_prefix(sizeof(T));
    return true;
  }
  bool Str(std::string* s) {
    uint32_t n = 0;
    if (!Get(&n) || in_.size() < n) return false;
    s->assign(in_.data(), n);
    in_.remove_prefix(n);
    return true;
  }
  bool Floats(std::vector<float>* v) {
    uint32_t n = 0;
    if (!Get(&n) || in_.size() / sizeof(float) < n) return false;
    v->resize(n);
    // An empty vector's data() may be null, which memcpy must not get.
    if (n > 0) std::memcpy(v->data(), in_.data(), n * sizeof(float));
    in_.remove_prefix(n * sizeof(float));
    return true;
  }
  bool done() const { return in_.empty(); }

 private:
  absl::string_view in_;
};

}  // namespace normserve::server

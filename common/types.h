// Element types and layouts of tensors, shared by the kernels, the server
// and the C++ client. No gRPC, no protobuf.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace normserve {

enum class DType { kFloat32, kFloat16, kBFloat16 };
enum class Layout { kNCHW, kNHWC };

// Returns the size in bytes of one element of `dtype`.
size_t DTypeSize(DType dtype);
const char* DTypeName(DType dtype);
const char* LayoutName(Layout layout);

// Returns "[d0, d1, ...]".
std::string ShapeToString(const std::vector<int64_t>& dims);

}  // namespace normserve

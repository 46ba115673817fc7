// The one place where the normalization kinds this build serves are
// registered. A new kind adds its files under server/core/layers/ and one
// line here.
#include "server/core/layer_kind.h"
#include "server/core/layers/batch_norm_layer.h"
#include "server/core/layers/row_norm_layer.h"

namespace normserve::server {

const KindRegistry& BuiltinKinds() {
  static const KindRegistry* const registry = [] {
    auto* r = new KindRegistry;
    // Names are distinct.
    r->Register(NewBatchNormKind()).IgnoreError();
    r->Register(NewLayerNormKind()).IgnoreError();
    r->Register(NewRMSNormKind()).IgnoreError();
    r->Register(NewGroupNormKind()).IgnoreError();
    r->Register(NewInstanceNormKind()).IgnoreError();
    r->Register(NewSyncBatchNormKind()).IgnoreError();
    return r;
  }();
  return *registry;
}

}  // namespace normserve::server

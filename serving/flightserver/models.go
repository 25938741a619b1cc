package flightserver

import (
	"context"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/serving/batcher"
	"github.com/kilnml/kiln/serving/manager"
	"github.com/kilnml/kiln/serving/repository"
)

// Model is one serving version of a model, as DoExchange uses it. A
// *manager.Version is one (see ManagerModels).
type Model interface {
	// Name returns the model's name.
	Name() string
	// Number returns the version number.
	Number() int64
	// Config returns the model's configuration: its inputs, outputs and
	// max_batch_size.
	Config() *repository.Config
	// Infer runs one request through the version's batcher, with the
	// semantics of batcher.Batcher.Submit.
	Infer(ctx context.Context, inputs []batcher.Tensor) ([]batcher.Tensor, error)
	// ForwardTensors runs a whole batch of C tensors in one execution
	// on one of the version's instances, with the semantics of
	// manager.Version.ForwardTensors: the caller owns the outputs.
	ForwardTensors(ctx context.Context, inputs []*core.Tensor) ([]*core.Tensor, error)
	// Stats returns the version's statistics, which DoExchange records
	// each request's outcome in, as the gRPC service does.
	Stats() *batcher.Stats
	// Release ends the use of the version that Models.Acquire began.
	Release()
}

// Models finds serving model versions. ManagerModels adapts the serving
// manager, so that DoExchange shares the gRPC service's versions, batchers
// and statistics.
type Models interface {
	// Acquire returns a serving version of model name; version "" is the
	// highest loaded one. Errors wrap manager.ErrNotFound for unknown
	// models or versions and manager.ErrUnavailable for models without a
	// serving version. The caller must Release the version.
	Acquire(name, version string) (Model, error)
}

// ManagerModels returns the Models of a serving manager, such as
// serving.Server.Manager().
func ManagerModels(m *manager.Manager) Models { return managerModels{m} }

type managerModels struct{ m *manager.Manager }

func (mm managerModels) Acquire(name, version string) (Model, error) {
	v, err := mm.m.Acquire(name, version)
	if err != nil {
		return nil, err
	}
	return v, nil
}

package httpserver

import (
	"net/http"
	"time"

	"github.com/kilnml/kiln/serving/auth"
)

// Dataset is a stored dataset as GET /v2/datasets lists it: its name,
// schema, rows, record batches, bytes and when it was last committed (a
// DoPut of the same name replaces it: that time is its version).
type Dataset struct {
	Name     string         `json:"name"`
	Schema   []DatasetField `json:"schema"`
	Rows     int64          `json:"rows"`
	Batches  int64          `json:"batches"`
	Bytes    int64          `json:"bytes"`
	Modified time.Time      `json:"modified"`
}

// DatasetField is one column of a Dataset's schema: its name, its Arrow
// type as text ("float32", "utf8", "dictionary<...>") and nullability.
type DatasetField struct {
	Name     string `json:"name"`
	Type     string `json:"type"`
	Nullable bool   `json:"nullable"`
}

// Datasets lists the datasets a server stores (the Flight service's
// dataset store, wired by serving).
type Datasets interface {
	Datasets() ([]Dataset, error)
}

// routeDatasets serves GET /v2/datasets, a read-only listing of the
// stored datasets ({"datasets": [Dataset...]}, by name), when
// Options.Datasets is set. It is an auth.Control call like the registry's.
func (h *Handler) routeDatasets() {
	if h.opts.Datasets == nil {
		return
	}
	h.route(http.MethodGet, "/v2/datasets", auth.Control, func(w http.ResponseWriter, r *http.Request) {
		ds, err := h.opts.Datasets.Datasets()
		if err != nil {
			writeStatus(w, err)
			return
		}
		for i := range ds {
			ds[i].Schema = nonNil(ds[i].Schema)
		}
		writeJSON(w, map[string]any{"datasets": nonNil(ds)})
	})
}
